"""Peak memory and time of a streamed quantization (``quantlab.quantize_checkpoint``) of a
synthetic checkpoint of a real architecture's shapes (scripts/make_synthetic_checkpoint.py).

    python bench/memory/stream_quantize.py --preset llama3-70b --blocks 14 --method rtn
    python bench/memory/stream_quantize.py --preset llama3-8b --blocks 4 --method gptq \\
        --calib-samples 8 --calib-seq-len 512

The quantization runs in a child process, so the peak resident memory reported (the child's
``VmHWM``) is the run's own, from the import of quantlab to the checkpoint in place. The
synthetic checkpoint is written once under ``--work`` and reused. Prints one JSON object (and, with
``--markdown``, a table row for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, sys, time, torch
start = time.perf_counter()
from quantlab.config import CalibConfig
from quantlab.methods.registry import get_method
from quantlab.pipeline import quantize_checkpoint
from transformers import AutoConfig, AutoTokenizer
args = json.loads(sys.argv[1])
config = get_method(args["method"]).config_cls(**args["options"])
calib = samples = tok = None
if args["calib_samples"]:
    calib = CalibConfig(n_samples=args["calib_samples"], seq_len=args["calib_seq_len"])
if args["random_calib"]:
    # Random token ids: memory and time do not depend on the text (a machine without the
    # calibration text's package or the bundled tokenizer measures the same).
    vocab = AutoConfig.from_pretrained(args["source"]).vocab_size
    shape = (calib.n_samples if calib else 128, calib.seq_len if calib else 512)
    samples = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
else:
    tok = AutoTokenizer.from_pretrained(args["source"])
t0 = time.perf_counter()
report = quantize_checkpoint(
    args["source"], args["out"], config, tok, calib, device=args["device"],
    dtype=getattr(torch, args["dtype"]), max_shard_size=args["max_shard_size"], progress=False,
    samples=samples,
)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"quantize_s": time.perf_counter() - t0,
                  "peak_rss_bytes": int(hwm[0].split()[1]) * 1024 if hwm else None,
                  "total_s": time.perf_counter() - start,
                  "layers": len(report.layers),
                  "solver_s": sum(l.seconds for l in report.layers),
                  "layers": [[l.name, l.out_features, l.in_features, l.seconds]
                             for l in report.layers],
                  "block_seconds": report.block_seconds,
                  "peak_device_bytes": report.peak_device_bytes,
                  "plan_bytes": report.details["memory_plan"]["total"],
                  "plan": report.details["memory_plan"]}))
"""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _synthetic(work: Path, preset: str, blocks: int) -> Path:
    """The synthetic checkpoint for (preset, blocks), written unless already there."""
    path = work / f"synthetic-{preset}-{blocks}"
    info = path / "synthetic.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if meta.get("preset") == preset and meta.get("blocks") == blocks:
            return path
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_synthetic_checkpoint

    return make_synthetic_checkpoint.write_checkpoint(path, preset, blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="where each block is computed (cuda: GPU)")
    parser.add_argument("--calib-samples", type=int, default=0, help="0: the method's default")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument(
        "--random-calib", action="store_true", help="random token ids instead of wiki-calib text"
    )
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "stream-bench")
    parser.add_argument("--keep-output", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--option", action="append", default=[], help="method option name=value (JSON value)"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    source = _synthetic(args.work, args.preset, args.blocks)
    out = args.work / f"quantized-{args.preset}-{args.blocks}-{args.method}"
    options = {}
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    spec = {
        "source": str(source),
        "out": str(out),
        "method": args.method,
        "dtype": args.dtype,
        "device": args.device,
        "max_shard_size": args.max_shard_size,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "random_calib": args.random_calib,
        "options": options,
    }
    # The commit of the code the child imports (taken now, not after a long run).
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        if done.returncode < 0:
            # SIGKILL from the kernel's OOM killer leaves no message of its own.
            sys.stderr.write(
                f"\nthe quantizing process was killed by signal {-done.returncode}"
                + (" (out of memory?)" if done.returncode == -9 else "")
                + "\n"
            )
        return 1
    child = json.loads(done.stdout.strip().splitlines()[-1])
    # The child's VmHWM: its ru_maxrss would include the parent's memory at the fork (Linux
    # carries it across exec), which writing a synthetic checkpoint first makes large.
    peak = child["peak_rss_bytes"] or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "preset": args.preset,
        "blocks": args.blocks,
        "method": args.method,
        "dtype": args.dtype,
        "options": options,
        "source_bytes": _dir_bytes(source),
        "output_bytes": _dir_bytes(out),
        "peak_rss_bytes": peak,
        "wall_s": wall,
        "quantize_s": child["quantize_s"],
        "seconds_per_block": child["quantize_s"] / args.blocks,
        "block_seconds": child["block_seconds"],
        # Per linear: name, out and in features, solve seconds (the multi-rank time model's input:
        # bench/distributed/ranks_vs_threads.py --predict-from).
        "layers": child["layers"],
        "device": args.device,
        "peak_device_bytes": child["peak_device_bytes"],
        "plan_bytes": child["plan_bytes"],
        "plan_over_peak": child["plan_bytes"] / peak,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
    }
    if not args.keep_output:
        shutil.rmtree(out)
    print(json.dumps(result, indent=2))
    if args.markdown:
        gib = 2**30
        device_peak = child["peak_device_bytes"]
        gpu = f" (GPU {device_peak / gib:.2f} GiB)" if device_peak else ""
        print(
            f"| {args.preset} x {args.blocks} blocks | {args.method} | "
            f"{result['source_bytes'] / gib:.2f} GiB | {result['output_bytes'] / gib:.2f} GiB | "
            f"{peak / gib:.2f} GiB{gpu} | {result['seconds_per_block']:.1f} s | {result['date']} | "
            f"{commit} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
