"""Several ranks against one process on the same cores: what the collectives and the parallel
split cost, how much each block moves, and a time model for N ranks checked against the run.

    python bench/distributed/ranks_vs_threads.py --model bundled --markdown
    python bench/distributed/ranks_vs_threads.py --model llama3-8b --blocks 4 \\
        --calib-samples 8 --calib-seq-len 512 --markdown

Three runs of the same quantization (``quantize_checkpoint``, streamed block by block, the same
calibration token ids handed to each), each in child processes of its own:

* ``1 process x T threads`` (T = ``--ranks``): the baseline, every core in one process;
* ``R ranks x 1 thread`` (``torchrun --standalone --nproc-per-node R``, gloo): data-parallel
  calibration, weight-parallel solving;
* ``1 process x 1 thread``: the per-block breakdown the time model starts from.

The ratio ``R ranks / 1 process`` is the overhead (or gain) of the split and the collectives at
equal cores. The communication volume per block is what the report's
:class:`quantlab.calib.parallel.Traffic` counted on every rank (logical payload, sent and
received), divided by the blocks.

The time model (docs/distributed.md): per block,
``T(R) = F / R + max_r S_r + C(R)`` where ``F`` is the block's calibration forward passes
and replay (data-parallel: each rank runs ``1 / R`` of the windows), ``S_r`` the solve seconds of
the linears rank ``r`` owns (owners from :func:`quantlab.calib.parallel.assign_owners` on the
one-thread run's measured per-linear seconds), and ``C(R)`` the collectives: the volume each
owner receives over the link's bandwidth (``--link-gbps``; measured from the run itself when
not given). The model's prediction from the one-thread run is printed beside the measured
``R ranks x 1 thread`` time.

``--predict-from RUN.json`` skips the runs and prints the model's ``T(R)`` for ``--predict-ranks``
from a one-rank run's JSON (``bench/memory/stream_quantize.py``'s output: its block seconds and
per-linear solve seconds; e.g. the GPU session's ``stream-gptq-8b`` step), with ``C(R)`` from the
Hessian volume over ``--link-gbps``: the N-GPU time the issue asks for, from one GPU.

The synthetic checkpoints come from scripts/make_synthetic_checkpoint.py (written once under
``--work``); ``--model bundled`` uses the bundled SmolLM2-135M. Prints one JSON object per run
and the comparison, and with ``--markdown`` the table rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "memory"))
from stream_quantize import _synthetic  # noqa: E402

_CHILD = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
start = time.perf_counter()
import numpy
import torch.distributed as dist
from quantlab.config import CalibConfig
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_checkpoint
ranked = "RANK" in os.environ
if ranked:
    dist.init_process_group("gloo")
rank = dist.get_rank() if ranked else 0
samples = torch.from_numpy(numpy.load(args["samples"]))
calib = CalibConfig(n_samples=samples.shape[0], seq_len=samples.shape[1])
t0 = time.perf_counter()
report = quantize_checkpoint(
    args["source"], args["out"], config_from_dict(args["config"]), None, calib,
    dtype=getattr(torch, args["dtype"]), progress=False, samples=samples,
)
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
result = {
    "rank": rank,
    "quantize_s": seconds,
    "peak_rss_bytes": int(hwm[0].split()[1]) * 1024,
    "block_seconds": report.block_seconds,
    "layers": [[l.name, l.out_features, l.in_features, l.seconds] for l in report.layers],
    "parallel": report.details.get("parallel"),
}
with open(os.path.join(args["results"], f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
if ranked:
    dist.destroy_process_group()
"""


def _samples(source: Path, n: int, seq_len: int, path: Path, bundled: bool) -> None:
    """Calibration token ids, drawn once: wiki-calib text for the bundled model, random ids for
    a synthetic checkpoint (its weights are random too; time and traffic do not depend on it)."""
    import numpy as np
    import torch
    from transformers import AutoConfig

    if bundled:
        from transformers import AutoTokenizer

        from quantlab.calib.data import calibration_samples

        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = calibration_samples(tokenizer, "wiki-calib", n, seq_len, 0)
    else:
        vocab = AutoConfig.from_pretrained(source).vocab_size
        ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))
    np.save(path, ids.numpy())


def _run(
    name: str, source: Path, config: dict, samples: Path, work: Path, threads: int, ranks: int,
    dtype: str,
) -> dict:  # fmt: skip
    results = work / f"results-{name}"
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    args = json.dumps(
        {"source": str(source), "out": str(out), "config": config, "samples": str(samples),
         "results": str(results), "threads": threads, "dtype": dtype}
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = work / "child.py"
    script.write_text(_CHILD)
    if ranks > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), str(script)]
    else:
        command = [sys.executable, str(script)]
    done = subprocess.run([*command, args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    per_rank = [json.loads((results / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"name": name, "threads": threads, "ranks": ranks, "per_rank": per_rank}


def _groups(source: Path) -> tuple[tuple[str, ...], ...]:
    """The architecture's sequential groups (owners are assigned per group)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.models.arch import resolve

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return resolve(model).sequential_groups


def _owned_solve_seconds(
    layers: list, groups: tuple[tuple[str, ...], ...], blocks: int, ranks: int
) -> float:
    """Per block, the solve seconds on ``ranks`` ranks: for each sequential group, its linears
    owned as :func:`quantlab.calib.parallel.assign_owners` owns them (by the cost model), each
    taking the seconds the one-thread run measured, and the group done when its slowest owner
    is."""
    from quantlab.calib.parallel import assign_owners, solve_cost

    measured = {name: (n, k, seconds) for name, n, k, seconds in layers}
    total = 0.0
    for index in range(blocks):
        for group in groups:
            names = {f".{index}.{g}" for g in group}
            rows = [v for m, v in measured.items() if any(m.endswith(n) for n in names)]
            if not rows:
                continue
            owners = assign_owners([solve_cost("gptq", k, n) for n, k, _ in rows], ranks)
            loads = [0.0] * ranks
            for (_, _, seconds), owner in zip(rows, owners, strict=True):
                loads[owner] += seconds
            total += max(loads)
    return total / max(blocks, 1)


def _model(
    one_thread: dict, ranked: dict, groups: tuple[tuple[str, ...], ...],
    link_bytes_per_s: float | None,
) -> dict:  # fmt: skip
    """The time model's prediction for ``ranked``'s rank count from the one-thread run."""
    single = one_thread["per_rank"][0]
    ranks = ranked["ranks"]
    blocks = len(single["block_seconds"])
    block = sum(single["block_seconds"]) / blocks
    solve = sum(layer[3] for layer in single["layers"]) / blocks
    forward = block - solve
    owned = _owned_solve_seconds(single["layers"], groups, blocks, ranks)
    traffic = ranked["per_rank"][0]["parallel"]["ranks"]
    received = max(row["reduce"]["bytes_in"] + row["broadcast"]["bytes_in"] for row in traffic)
    if link_bytes_per_s is None:
        # The run's own reduce: bytes received over the seconds of the rank that received most
        # (its seconds include waits, so this under-estimates the link: a conservative model).
        busiest = max(traffic, key=lambda row: row["reduce"]["bytes_in"])
        link_bytes_per_s = busiest["reduce"]["bytes_in"] / max(busiest["reduce"]["seconds"], 1e-9)
    communicate = received / blocks / link_bytes_per_s
    predicted = forward / ranks + owned + communicate
    measured = sum(ranked["per_rank"][0]["block_seconds"]) / blocks
    return {
        "forward_s": forward, "solve_s": solve, "owned_solve_s": owned,
        "communicate_s": communicate, "link_bytes_per_s": link_bytes_per_s,
        "predicted_block_s": predicted, "measured_block_s": measured,
        "measured_over_predicted": measured / predicted,
    }  # fmt: skip


def predict(
    run: dict, groups: tuple[tuple[str, ...], ...], ranks: list[int], link_bytes_per_s: float
) -> list[dict]:
    """``T(R)`` per block for each of ``ranks`` from a one-rank run: ``F / R`` (forwards, data
    parallel) + the solve seconds of each group's slowest owner + ``C(R)``, the Hessians of the
    block's groups (fp32 ``K x K`` from every other rank to an owner) over the link, taken one
    group after another (an upper bound: the reductions of different owners overlap)."""
    blocks = len(run["block_seconds"])
    block = sum(run["block_seconds"]) / blocks
    solve = sum(layer[3] for layer in run["layers"]) / blocks
    widths = {}
    for name, _, k, _ in run["layers"]:
        for group in groups:
            if any(name.endswith(f".{member}") for member in group):
                widths[group] = k
    rows = []
    for r in ranks:
        owned = _owned_solve_seconds(run["layers"], groups, blocks, r)
        communicate = sum((r - 1) * 4 * k * k for k in widths.values()) / link_bytes_per_s
        rows.append({
            "ranks": r, "forward_s": block - solve, "owned_solve_s": owned,
            "communicate_s": communicate,
            "block_s": (block - solve) / r + owned + communicate,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="bundled, or a synthetic preset")
    parser.add_argument("--blocks", type=int, default=4, help="synthetic: decoder blocks")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--option", action="append", default=[], help="config name=JSON value")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--link-gbps", type=float, default=None, help="model: link bandwidth")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "stream-bench")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--predict-from", type=Path, help="a one-rank run's JSON: model only")
    parser.add_argument("--predict-ranks", default="1,2,4,8")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bundled = args.model == "bundled"
    if args.predict_from is not None:
        run = json.loads(args.predict_from.read_text())
        if "layers" not in run:
            raise SystemExit(f"{args.predict_from} has no per-linear seconds ('layers')")
        source = _synthetic(args.work, run["preset"], run["blocks"])
        link = (args.link_gbps or 100.0) * 1e9 / 8
        ranks = [int(r) for r in args.predict_ranks.split(",")]
        for row in predict(run, _groups(source), ranks, link):
            print(json.dumps({"preset": run["preset"], "device": run["device"], **row}))
        return 0
    if bundled:
        from quantlab.export.default_model import default_model_dir

        source = default_model_dir()
    else:
        source = _synthetic(args.work, args.model, args.blocks)
    config: dict = {"method": args.method}
    for item in args.option:
        key, _, value = item.partition("=")
        config[key] = json.loads(value)
    work = Path(tempfile.mkdtemp(prefix="ranks-", dir=args.work))
    samples = work / "samples.npy"
    _samples(source, args.calib_samples, args.calib_seq_len, samples, bundled)
    r = args.ranks
    runs = [
        _run(f"1x{r}", source, config, samples, work, r, 1, args.dtype),
        _run(f"{r}x1", source, config, samples, work, 1, r, args.dtype),
        _run("1x1", source, config, samples, work, 1, 1, args.dtype),
    ]
    shutil.rmtree(work, ignore_errors=True)
    baseline, ranked, one = runs
    blocks = len(ranked["per_rank"][0]["block_seconds"])
    traffic = ranked["per_rank"][0]["parallel"]["ranks"]
    per_block = [
        {
            "rank": row["rank"],
            "sent_mib": sum(row[k]["bytes_out"] for k in ("reduce", "broadcast")) / blocks / 2**20,
            "received_mib": sum(row[k]["bytes_in"] for k in ("reduce", "broadcast"))
            / blocks
            / 2**20,
            "reduce_s": row["reduce"]["seconds"] / blocks,
            "broadcast_s": row["broadcast"]["seconds"] / blocks,
            "settle_s": row["settle"]["seconds"] / blocks,
            "solve_s": row["solve_seconds"] / blocks,
        }
        for row in traffic
    ]
    link = None if args.link_gbps is None else args.link_gbps * 1e9 / 8
    summary = {
        "model": args.model,
        "blocks": blocks,
        "config": config,
        "calib": [args.calib_samples, args.calib_seq_len],
        "seconds": {run["name"]: run["per_rank"][0]["quantize_s"] for run in runs},
        "peak_rss_gib": {
            run["name"]: [p["peak_rss_bytes"] / 2**30 for p in run["per_rank"]] for run in runs
        },
        "ranks_over_threads": ranked["per_rank"][0]["quantize_s"]
        / baseline["per_rank"][0]["quantize_s"],
        "per_block": per_block,
        "time_model": _model(one, ranked, _groups(source), link),
        "device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }
    print(json.dumps(summary))
    if args.markdown:
        s, m = summary["seconds"], summary["time_model"]
        name = f"{args.model}" + ("" if bundled else f" ({blocks} blocks)")
        print(
            f"| {name} | {args.method} | {args.calib_samples} x {args.calib_seq_len} | "
            f"{s[f'1x{r}']:.0f} | {s[f'{r}x1']:.0f} | {summary['ranks_over_threads']:.2f} | "
            f"{s['1x1']:.0f} | "
            + " / ".join(f"{row['received_mib']:.0f}" for row in per_block)
            + f" | {m['predicted_block_s']:.1f} | {m['measured_block_s']:.1f} | "
            f"{summary['date']} | {summary['commit']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
