"""Dequantize + GEMM on the CPU: the "dequantize + GEMM" column of docs/benchmarks.md's "batches
9-32 of large weights stay on the kernel" table (what ``groupwise_int_mm`` did above 8 rows before
that change): ``torch.ops.quantlab.groupwise_int_dequant`` to a fresh fp32 weight, then
``torch.matmul``, timed together. ``--mm`` times ``groupwise_int_mm`` itself instead (the op as it
routes batches now).

Random 4-bit codes and zero points packed with quantlab.formats.bitstream, fp32 scales, x fp32;
one warm-up call, then the best and the median of ``--reps`` calls. One line per case, in the
format of bench/harness/gemv_cpu_timing.cpp (scripts/bench_cpu_gemv.sh --chunked reads it)::

    python scripts/bench_cpu_dequant_gemm.py                        # the table's shapes
    python scripts/bench_cpu_dequant_gemm.py 4096,14336,128,16      # N,K,GROUP,M cases
    python scripts/bench_cpu_dequant_gemm.py --mm 4096,14336,128,33

Needs the compiled extension (``python setup.py build_ext --inplace``); exits 1 without it rather
than timing the PyTorch reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

# N, K, GROUP, M of the doc's table.
DEFAULT_CASES = (
    "4096,14336,128,16",
    "4096,14336,128,32",
    "4096,14336,128,48",
    "4096,4096,64,16",
    "4096,4096,64,32",
    "4096,4096,64,64",
    "1536,576,64,12",
    "576,1536,64,16",
)


def time_case(n: int, k: int, group: int, m: int, args: argparse.Namespace) -> str:
    from quantlab.formats.bitstream import pack_bitstream

    gen = torch.Generator().manual_seed(args.seed)
    levels = 1 << args.bits
    qweight = pack_bitstream(torch.randint(0, levels, (n, k), generator=gen), args.bits)
    qzeros = pack_bitstream(torch.randint(0, levels, (n, k // group), generator=gen), args.bits)
    scales = 0.005 + 0.01 * torch.rand(n, k // group, generator=gen)
    x = torch.rand(m, k, generator=gen) * 2 - 1
    ops = torch.ops.quantlab

    def call() -> torch.Tensor:
        if args.mm:
            return ops.groupwise_int_mm(x, qweight, scales, qzeros, args.bits, group)
        w = ops.groupwise_int_dequant(qweight, scales, qzeros, args.bits, group, k, torch.float32)
        return torch.matmul(x, w.t())

    call()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    op = "mm" if args.mm else "dequant+matmul"
    return (
        f"n={n} k={k} group={group} bits={args.bits} m={m} op={op} "
        f"threads={torch.get_num_threads()} reps={args.reps} "
        f"best_us={min(times):.1f} median_us={statistics.median(times):.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="N,K,GROUP,M")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mm", action="store_true", help="time groupwise_int_mm instead")
    args = parser.parse_args()

    from quantlab.ops import groupwise_int

    op = "groupwise_int_mm" if args.mm else "groupwise_int_dequant"
    if not groupwise_int.compiled("cpu", op):
        print(f"{op} has no compiled CPU kernel in this build", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    for case in args.cases:
        n, k, group, m = (int(v) for v in case.split(","))
        print(time_case(n, k, group, m, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
