"""The bundled model through the streamed pipeline: fp32 against bf16 compute (speed and
perplexity, for the default ``--dtype``), and the streamed run against the same method on the
model held in memory (time ratio, same run).

    python bench/memory/bundled_pipeline.py --methods rtn gptq awq --markdown

Each measurement runs in a child process of its own (the CLI reports its own peak RSS):

* ``streamed``: ``quantlab quantize`` (the CLI: streamed block by block, baseline and result
  perplexity measured in the same pass over wiki-eval, 10 x 2048 tokens) in each compute dtype;
* ``streamed, no eval`` and ``resident``: the quantization alone, streamed from the checkpoint
  into a new one (``quantize_checkpoint``), and what the CLI did before it streamed (load the
  whole model, ``quantize_model``, ``quantlab.save``), in fp32, both timed from the start of the
  call to the checkpoint on disk; their ratio is the cost of streaming.

Calibration: the CLI default (32 x 512 wiki-calib tokens). Prints one JSON object per row, and
with ``--markdown`` a table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_QUANTIZE_ONLY = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
from transformers import AutoModelForCausalLM, AutoTokenizer
from quantlab.export.default_model import default_model_dir
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_checkpoint, quantize_model
path = default_model_dir()
tok = AutoTokenizer.from_pretrained(path)
config = config_from_dict({"method": args["method"]})
t0 = time.perf_counter()
if args["mode"] == "resident":
    # What the CLI did before it streamed: load the whole model, quantize it, save it.
    import quantlab
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = quantize_model(model, config, tok, progress=False)
    quantlab.save(model, args["out"], report, tok)
else:
    report = quantize_checkpoint(path, args["out"], config, tok, progress=False)
print(json.dumps({"quantize_s": time.perf_counter() - t0, "seconds": report.seconds}))
"""


def _child(argv: list[str]) -> tuple[dict, float]:
    """Run ``argv``; (its last stdout line as JSON, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        signal = f" (killed by signal {-done.returncode})" if done.returncode < 0 else ""
        raise SystemExit(f"failed{signal}: {' '.join(argv[:6])} ...")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument(
        "--quantize-only",
        action="store_true",
        help="only the streamed-vs-resident quantization runs (not the CLI runs per dtype)",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for dtype in () if args.quantize_only else ("float32", "bfloat16"):
                out = str(Path(tmp) / f"{method}-{dtype}")
                cli = [sys.executable, "-m", "quantlab.cli", "quantize", "--method", method]
                cli += ["--dtype", dtype, "--out", out, "--overwrite", "--no-progress", "--json"]
                result, wall = _child(cli)
                rows.append(
                    {
                        "method": method,
                        "mode": "streamed",
                        "dtype": dtype,
                        "ppl": result["ppl"],
                        "ppl_baseline": result["ppl_baseline"],
                        "quantize_s": result["quantize_seconds"],
                        "wall_s": wall,
                        "peak_rss_bytes": result["peak_rss_bytes"],
                        "checkpoint_bytes": result["checkpoint_bytes"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            for mode in ("streamed, no eval", "resident"):
                spec = {"method": method, "mode": mode, "out": str(Path(tmp) / f"{method}-q")}
                result, wall = _child([sys.executable, "-c", _QUANTIZE_ONLY, json.dumps(spec)])
                rows.append(
                    {
                        "method": method,
                        "mode": mode,
                        "dtype": "float32",
                        "quantize_s": result["quantize_s"],
                        "wall_s": wall,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.markdown:
        print(f"\n{date}, commit {commit}\n")
        print(
            "| method | run | dtype | ppl | ppl before | quantize s | wall s | peak RSS | written |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ppl = f"{r['ppl']:.3f}" if "ppl" in r else ""
            base = f"{r['ppl_baseline']:.3f}" if "ppl_baseline" in r else ""
            rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r.get("peak_rss_bytes") else ""
            size = f"{r['checkpoint_bytes'] / 2**20:.1f} MiB" if r.get("checkpoint_bytes") else ""
            print(
                f"| {r['method']} | {r['mode']} | {r['dtype']} | {ppl} | {base} | "
                f"{r['quantize_s']:.1f} | {r['wall_s']:.1f} | {rss} | {size} |"
            )
        for method in args.methods:
            by = {r["mode"]: r for r in rows if r["method"] == method and r["dtype"] == "float32"}
            ratio = by["streamed, no eval"]["quantize_s"] / by["resident"]["quantize_s"]
            print(f"\n{method}: streamed / resident quantize time = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
