"""quantlab's streamed GPTQ against llm-compressor's GPTQ on a synthetic checkpoint of a real
architecture's shapes, back to back: peak resident memory and wall time, as ratios.

    python bench/memory/vs_llmcompressor.py --preset llama3-8b --blocks 4 --markdown

Both tools get the same calibration token ids (``--calib-samples`` x ``--calib-seq-len`` windows
of wiki-calib, drawn once here and handed to each as a ``.npy`` file), the same scheme (W4, group
64, asymmetric, static act-order) and a bf16 source loaded in bf16, and both write their
checkpoint (quantlab: its streamed layout; llm-compressor: compressed-tensors pack-quantized,
``save_pretrained(save_compressed=True)``). Each tool runs in a child process of its own
(llm-compressor in its venv, ``.venv-peers/llmc``, see ../shared/reference/environment.md) that
reports its own peak RSS (``VmHWM``: ``ru_maxrss`` would count the parent's memory at the fork)
and the seconds from before loading the model to the
checkpoint on disk.

quantlab runs with its defaults for GPTQ (clip search on, true-sequential); llm-compressor with
its own (``minmax`` observer, no clip search, sequential onloading by decoder layer). Each
``--quantlab-variant KEY=VALUE[,KEY=VALUE]`` adds one more quantlab run with those GPTQ options
(e.g. ``clip_search=false``: the same rounding as llm-compressor's observer), in the same
invocation so that its ratios come from the same machine state. Prints one JSON object per run
and the ratios (quantlab / llm-compressor), and with ``--markdown`` the table rows for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_quantize import _dir_bytes, _synthetic  # noqa: E402

# The child's own high-water mark: VmHWM belongs to the memory map exec made, where ru_maxrss
# (Linux) carries over the RSS of the parent it was forked from.
_PEAK = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

_QUANTLAB = (
    _PEAK
    + r"""
import json, sys, time
start = time.perf_counter()
import numpy, torch
from transformers import AutoTokenizer
from quantlab.methods.gptq import GPTQConfig
from quantlab.pipeline import quantize_checkpoint
args = json.loads(sys.argv[1])
ids = torch.from_numpy(numpy.load(args["ids"], allow_pickle=False))
tok = AutoTokenizer.from_pretrained(args["source"])
t0 = time.perf_counter()
report = quantize_checkpoint(
    args["source"], args["out"], GPTQConfig(bits=4, group_size=64, sym=False, **args["options"]),
    tok,
    dtype=torch.bfloat16, progress=False, samples=ids,
)
print(json.dumps({"seconds": time.perf_counter() - t0, "total_s": time.perf_counter() - start,
                  "block_seconds": report.block_seconds,
                  "peak_rss_bytes": peak_rss()}))
"""
)

_LLMC = (
    _PEAK
    + r"""
import json, sys, time
start = time.perf_counter()
import importlib.metadata as md
import numpy, torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
ids = numpy.load(args["ids"], allow_pickle=False)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": numpy.ones_like(ids).tolist()})
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=False, strategy="group", group_size=64, actorder="static"))
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args["source"], dtype=torch.bfloat16).eval()
oneshot(model=model, processor=args["source"], dataset=ds,
        recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
model.save_pretrained(args["out"], save_compressed=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "total_s": time.perf_counter() - start,
                  "version": md.version("llmcompressor"),
                  "peak_rss_bytes": peak_rss()}))
"""
)


def _run(python: str, code: str, spec: dict) -> dict:
    """Run ``code`` under ``python``; its last stdout line as JSON, plus the wall seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [python, "-c", code, json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        killed = f" (killed by signal {-done.returncode})" if done.returncode < 0 else ""
        raise SystemExit(f"{python} failed with exit status {done.returncode}{killed}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _options(text: str) -> dict[str, object]:
    """``clip_search=false,damp_percent=0.02`` as GPTQConfig keyword arguments."""
    options: dict[str, object] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            options[key.strip()] = low == "true"
        else:
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "stream-bench")
    parser.add_argument(
        "--llmc-python", default=str(ROOT / ".venv-peers" / "llmc" / "bin" / "python")
    )
    parser.add_argument(
        "--quantlab-variant",
        action="append",
        default=[],
        type=_options,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one more quantlab run with these GPTQConfig options (repeatable)",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.llmc_python).is_file():
        raise SystemExit(
            f"no llm-compressor venv at {args.llmc_python} (see ../shared/reference/environment.md)"
        )
    import numpy
    from transformers import AutoTokenizer

    from quantlab.calib.data import calibration_samples

    args.work.mkdir(parents=True, exist_ok=True)
    source = _synthetic(args.work, args.preset, args.blocks)
    ids = calibration_samples(
        AutoTokenizer.from_pretrained(source), "wiki-calib", args.calib_samples, args.calib_seq_len
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        ids_path = Path(tmp) / "calib_ids.npy"
        numpy.save(ids_path, ids.numpy(), allow_pickle=False)
        runs = [("quantlab", sys.executable, _QUANTLAB, {})]
        for options in args.quantlab_variant:
            label = ", ".join(f"{k}={v}" for k, v in options.items())
            runs.append((f"quantlab ({label})", sys.executable, _QUANTLAB, options))
        runs.append(("llm-compressor", args.llmc_python, _LLMC, {}))
        for index, (tool, python, code, options) in enumerate(runs):
            out = Path(tmp) / f"run{index}"
            spec = {"source": str(source), "out": str(out), "ids": str(ids_path)}
            spec["options"] = options
            result = _run(python, code, spec)
            result["output_bytes"] = sum(
                _dir_bytes(d) for d in (out, *[p for p in out.iterdir() if p.is_dir()])
            )
            results[tool] = result
    peer = results["llm-compressor"]
    ratios = {
        tool: {
            "peak_rss": r["peak_rss_bytes"] / peer["peak_rss_bytes"],
            "seconds": r["seconds"] / peer["seconds"],
        }
        for tool, r in results.items()
        if tool != "llm-compressor"
    }
    summary = {
        "preset": args.preset,
        "blocks": args.blocks,
        "calib": [args.calib_samples, args.calib_seq_len],
        "source_bytes": _dir_bytes(source),
        "tools": results,
        "ratios_vs_llm_compressor": ratios,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
    }
    print(json.dumps(summary, indent=2))
    if args.markdown:
        gib = 2**30
        for tool, r in results.items():
            name = f"{tool} {r['version']}" if tool == "llm-compressor" else tool
            print(
                f"| {args.preset} x {args.blocks} blocks | {name} | "
                f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['seconds']:.0f} s | "
                f"{r['output_bytes'] / gib:.2f} GiB | "
                f"{summary['date']} | {commit} |"
            )
        for tool, ratio in ratios.items():
            print(
                f"| ratio {tool} / llm-compressor | | {ratio['peak_rss']:.2f} | "
                f"{ratio['seconds']:.2f} | | | |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
