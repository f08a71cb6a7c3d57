"""``quantlab`` command line: ``quantize`` a model and ``eval`` a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantlab.calib.parallel import Parallel
    from quantlab.methods.base import CalibConfig

__all__ = ["main"]


def _add_eval_args(p: argparse.ArgumentParser, text_default: str) -> None:
    p.add_argument(
        "--text",
        default=text_default,
        help="evaluation text: wiki-eval (offline default), lee, a .txt/.json/.parquet file, "
        "or a hub dataset (wikitext2-test, hf:<id>)",
    )
    p.add_argument("--eval-windows", type=int, default=10, help="windows of --eval-seq-len tokens")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype of the model; auto (default): the checkpoint's own (config.json), so "
        "a bf16 model computes in bf16 and an fp32 one in fp32 (an fp16 one: fp16 on a GPU, fp32 "
        "on the CPU)",
    )
    f = p.add_argument_group("fairness (stereotype score)")
    f.add_argument(
        "--fairness",
        action="store_true",
        help="also report the stereotype score: the share of stereotype / anti-stereotype pairs "
        "where the model prefers the stereotypical sentence (50%% = no preference)",
    )
    f.add_argument(
        "--fairness-pairs",
        default="quantlab",
        help="pairs: quantlab (shipped), stereoset, crows-pairs (hub), or a CrowS-Pairs .csv / "
        "StereoSet .json / .jsonl file",
    )
    f.add_argument(
        "--fairness-split",
        default="heldout",
        choices=["heldout", "calib", "all"],
        help="which half of the pairs (Fair-GPTQ calibrates on 'calib')",
    )
    f.add_argument(
        "--fairness-normalization",
        default="sum",
        choices=["sum", "mean"],
        help="compare sentence log-likelihoods summed over tokens, or per token",
    )
    f.add_argument("--fairness-batch-size", type=int, default=32)
    f.add_argument("--fairness-max-pairs", type=int, default=None, help="score only the first N")


# What `quantlab` alone prints: the commands a newcomer needs first.
GETTING_STARTED = """quantlab: low-bit quantization of LLM weights (README.md, docs/).

  quantlab quantize --method gptq --out out/smollm2-gptq     quantize the bundled SmolLM2-135M
                                                             (4-bit, groups of 64) and evaluate it
  quantlab eval --model out/smollm2-gptq                     perplexity and a generation check
  quantlab quantize --model DIR|hub-id --method awq --format compressed-tensors --out OUT
                                                             your model, in the layout vLLM serves

  quantlab quantize --help      every method and option
  quantlab --version            versions of quantlab and what it runs on
"""


def _versions() -> str:
    """quantlab's version and those of what it runs on, without importing them."""
    import platform
    from importlib import metadata

    from quantlab import __version__

    parts = [f"quantlab {__version__}", f"python {platform.python_version()}"]
    for package in ("torch", "transformers"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    built = sorted(
        p.name.split(".")[0].removeprefix("_C_") for p in Path(__file__).parent.glob("_C_*.so")
    )
    parts.append(f"kernel libraries: {', '.join(built) if built else 'none built'}")
    return ", ".join(parts)


class _VersionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_versions())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab", description=__doc__)
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print versions and exit")
    sub = parser.add_subparsers(dest="command")

    q = sub.add_parser("quantize", help="quantize a model, save it, and evaluate it")
    q.add_argument(
        "--model",
        default="default",
        help="'default' (bundled SmolLM2-135M-Instruct), a local model directory, or a hub id",
    )
    from quantlab.methods.registry import methods

    table = methods()
    q.add_argument(
        "--method",
        default="rtn",
        choices=list(table),
        help="; ".join(f"{name}: {m.help}" for name, m in table.items() if m.help),
    )
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64, help="32, 64, 128, or -1 for per-channel")
    q.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    q.add_argument(
        "--clip-search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shrink each group's range where that lowers its rounding error "
        "(default: on for gptq, off for rtn and awq, whose own clip search is activation-aware)",
    )
    q.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    q.add_argument(
        "--out",
        required=True,
        help="output checkpoint directory: a new or empty directory, or (with --overwrite) a "
        "checkpoint quantlab wrote; anything else, and the --model directory, is refused before "
        "any work. Written atomically, under a lock file beside it (.NAME.quantlab-lock) that "
        "refuses a second concurrent writer",
    )
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing quantlab checkpoint at --out (only once the new one is complete)",
    )
    q.add_argument(
        "--format",
        default="quantlab",
        choices=["quantlab", "gptq", "awq", "compressed-tensors"],
        help="checkpoint layout: quantlab's own, or the GPTQ, AWQ (GEMM, 4-bit) or "
        "compressed-tensors (pack-quantized, vLLM's native) layout transformers/vLLM read "
        "(groupwise-integer methods only)",
    )
    q.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file of the checkpoint (e.g. 5GB, 500MB, 2GiB); a larger "
        "checkpoint is written as shards with model.safetensors.index.json",
    )
    m = q.add_argument_group("memory")
    m.add_argument(
        "--activation-budget",
        default=None,
        help="RAM for the calibration activations between blocks (e.g. 8GB); beyond it they "
        "spill to --offload-dir (default: what the memory plan leaves of the available memory)",
    )
    m.add_argument(
        "--offload-dir",
        default=None,
        help="directory for activations past the budget (memory-mapped files, removed at the "
        "end); without it they must fit in RAM",
    )
    m.add_argument(
        "--no-memory-check",
        action="store_true",
        help="run even when the memory plan printed at the start exceeds the available memory",
    )
    q.add_argument("--calib", default="wiki-calib", help="calibration text source")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--calib-batch-size", type=int, default=None)
    q.add_argument(
        "--expert-min-tokens",
        type=int,
        default=16,
        help="mixtures of experts: an expert that fewer calibration tokens reach is solved with "
        "an identity Hessian (the method's data-free rounding); listed in the summary",
    )
    q.add_argument(
        "--calibrate-all-experts",
        action="store_true",
        help="mixtures of experts: every expert's statistics see every calibration token (the "
        "block output still follows the router)",
    )
    q.add_argument(
        "--max-stage-memory",
        default=None,
        metavar="SIZE",
        help="the most memory one calibration pass's Hessians may take (e.g. 16GiB): a stage "
        "of more (a large mixture's experts) runs as several passes over the block "
        "(gptq, fair-gptq, pvq, ternary)",
    )
    q.add_argument(
        "--routing-weighted-hessians",
        action="store_true",
        help="mixtures of experts: weight each token in an expert's Hessian by its routing "
        "weight (MoEQuant's affinity-guided Hessian; gptq, fair-gptq, pvq, ternary)",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ Hessian damping")
    q.add_argument(
        "--no-act-order",
        action="store_true",
        help="GPTQ: quantize columns left to right instead of by descending Hessian "
        "diagonal (act-order uses static groups, so it costs nothing at inference)",
    )
    q.add_argument("--no-true-sequential", action="store_true")
    for name, method in table.items():
        if method.add_arguments is not None:
            method.add_arguments(q.add_argument_group(f"{name} options"))
    q.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    q.add_argument(
        "--skip-baseline", action="store_true", help="do not evaluate the unquantized model"
    )
    _add_eval_args(q, "wiki-eval")

    e = sub.add_parser("eval", help="perplexity (and a generation smoke check) of a model")
    e.add_argument("--model", required=True, help="checkpoint directory, 'default', or a hub id")
    e.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking a quantlab checkpoint's files against the checksums recorded when it "
        "was written (the structural checks still run)",
    )
    e.add_argument(
        "--prompt",
        default="What is the capital of France?",
        help="prompt for the greedy generation smoke check ('' to skip)",
    )
    e.add_argument(
        "--memory-budget",
        default=None,
        help="BitStack checkpoints: load the best prefix of residual blocks that fits this many "
        "bytes of weights (e.g. 40MB, 0.5GiB); refused for other layouts",
    )
    _add_eval_args(e, "wiki-eval")

    i = sub.add_parser("info", help="what a checkpoint is: layout, method, bits, sizes, engines")
    i.add_argument("path", help="checkpoint directory")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.add_argument(
        "--no-hash", action="store_true", help="skip the content hash (it reads every tensor)"
    )
    i.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    """``quantlab info DIR``: the checkpoint's description (quantlab.export.info) as a table."""
    from quantlab.export.info import checkpoint_info

    info = checkpoint_info(args.path, with_hash=not args.no_hash)
    rows = [
        ("path", info["path"]),
        ("layout", f"{info['layout']}" + (f" ({info['format']})" if info.get("format") else "")),
        ("model", f"{info['model_type']} {info['architectures']}"),
    ]
    if info.get("method"):
        rows.append(("method", str(info["method"])))
    if info.get("method_config"):
        settings = ", ".join(f"{k}={v}" for k, v in sorted(info["method_config"].items()))
        rows.append(("settings", settings))
    if info.get("quantized_linears") is not None:
        rows.append(("quantized linears", str(info["quantized_linears"])))
    for encoding, count in (info.get("modules") or {}).items():
        rows.append((f"  {count} x", encoding))
    if info.get("bits_per_weight") is not None:
        rows.append(("bits / weight", f"{info['bits_per_weight']:.3f}"))
    rows.append(("on disk", f"{info['disk_bytes'] / 2**20:.1f} MiB in {len(info['files'])} files"))
    rows.append(
        ("in memory", f"{info['memory_bytes'] / 2**20:.1f} MiB (floats in {info['float_dtype']})")
    )
    for point in info.get("budget_curve") or []:
        rows.append(
            (
                "  budget",
                f"{point['memory_bytes'] / 2**20:.1f} MiB: +{point['blocks_added']} blocks",
            )
        )
    if "content_hash" in info:
        rows.append(("content hash", info["content_hash"]))
    rows.append(("loads in", ", ".join(info["engines"])))
    _print_table("quantlab info", rows, to_stderr=args.json)
    return info


def _method_config(args: argparse.Namespace) -> Any:
    from quantlab.methods.registry import get_method

    method = get_method(args.method)
    if args.format not in method.export_formats:
        raise ValueError(
            f"--format {args.format} is not available for --method {args.method} "
            f"(it writes: {', '.join(method.export_formats)})"
        )
    return method.config_from_args(args)


def _eval_ppl(model: Any, tokens: Any, args: argparse.Namespace) -> dict[str, Any]:
    from quantlab.eval.perplexity import perplexity

    return perplexity(
        model, tokens, args.eval_seq_len, args.eval_windows, progress=not args.no_progress
    ).to_dict()


def _eval_fairness(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from quantlab.calib.pairs import load_pairs, split_pairs
    from quantlab.eval.fairness import stereotype_score

    pairs = split_pairs(load_pairs(args.fairness_pairs), args.fairness_split)
    if args.fairness_max_pairs is not None:
        pairs = pairs[: args.fairness_max_pairs]
    result = stereotype_score(
        model,
        tokenizer,
        pairs,
        batch_size=args.fairness_batch_size,
        normalization=args.fairness_normalization,
        progress=not args.no_progress,
    )
    return result.to_dict() | {"pairs": args.fairness_pairs, "split": args.fairness_split}


def _fmt_fairness(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    cats = ", ".join(f"{k} {100 * v['score']:.1f}" for k, v in d["by_category"].items())
    return (
        f"{100 * d['score']:.1f} % (95% CI {100 * lo:.1f}-{100 * hi:.1f}, {d['n_pairs']} pairs; "
        f"{cats})"
    )


def _dtype_bits(dtype: str) -> float:
    return 32.0 if dtype == "float32" else 16.0


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _print_table(title: str, rows: list[tuple[str, str]], to_stderr: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=to_stderr).print(table)


def _fmt_ppl(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


def _model_dirs(spec: str) -> tuple[Path, ...]:
    """The local directory ``--model`` names (none for a hub id): ``--out`` must not replace it."""
    from quantlab.export.model_source import resolve_model_path

    path = Path(resolve_model_path(spec)[0])
    return (path,) if path.is_dir() else ()


def cmd_quantize(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Quantize, evaluate and save; ``command`` is the command line the output lock records."""
    from quantlab.calib.parallel import Parallel
    from quantlab.export.atomic import output_lock
    from quantlab.export.checkpoint_files import parse_size
    from quantlab.export.output_guard import check_output_target
    from quantlab.export.save import check_exportable
    from quantlab.methods.base import CalibConfig

    t0 = time.perf_counter()
    config = _method_config(args)
    # Refuse an unexportable encoding or a bad shard size before spending the quantization time.
    check_exportable(config, args.format)
    args.max_shard_bytes = parse_size(args.max_shard_size, "--max-shard-size")
    calib = CalibConfig(
        args.calib,
        args.calib_samples,
        args.calib_seq_len,
        args.seed,
        args.calib_batch_size,
        expert_min_tokens=args.expert_min_tokens,
        calibrate_all_experts=args.calibrate_all_experts,
        routing_weighted_hessians=args.routing_weighted_hessians,
        max_stage_bytes=(
            None
            if args.max_stage_memory is None
            else parse_size(args.max_stage_memory, "--max-stage-memory")
        ),
    )
    inputs = _model_dirs(args.model)
    parallel = Parallel.current()
    # Held until the checkpoint is in place: the target checks below cannot go stale, and a second
    # run writing the same --out fails now instead of silently replacing this one's result.
    # Taking it creates the parent directories and the lock file, which proves them writable.
    # Several ranks: rank 0 alone writes, so it alone locks and checks; all stop if it refuses.
    with contextlib.ExitStack() as held:
        refused: Exception | None = None
        if parallel.is_main:
            try:
                held.enter_context(output_lock(args.out, command=command))
                check_output_target(args.out, inputs=inputs, overwrite=args.overwrite)
            except Exception as exc:  # shared with the other ranks, then raised
                refused = exc
        parallel.settle(refused)
        return _quantize_locked(args, config, calib, t0, parallel)


def _quantize_locked(
    args: argparse.Namespace, config: Any, calib: CalibConfig, t0: float, parallel: Parallel
) -> dict[str, Any]:
    """The rest of ``quantize``, run while the output lock is held (``t0``: the start time): the
    model is streamed block by block from its checkpoint (:func:`quantize_checkpoint`), with the
    perplexity before and after measured in the same pass. On ranks other than 0 of a
    multi-process run the result is empty (rank 0 reports)."""
    from transformers import AutoTokenizer

    from quantlab.calib.data import load_text, token_stream
    from quantlab.export.fp8_source import is_float_source
    from quantlab.export.load import checkpoint_kind
    from quantlab.export.model_source import DTYPES, checkpoint_dtype, dtype_name, local_model_dir
    from quantlab.pipeline import quantize_checkpoint

    source, name = local_model_dir(args.model)
    if not is_float_source(checkpoint_kind(source)):
        raise ValueError(f"--model {args.model} is already a quantized checkpoint")
    if args.dtype == "auto":
        args.dtype = dtype_name(checkpoint_dtype(source, args.device))
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise OSError(f"could not load the tokenizer of {args.model!r}: {exc}") from exc
    tokens = None if args.no_eval else token_stream(tok, load_text(args.text))
    fairness_before = fairness_after = None
    if args.fairness and not args.skip_baseline and parallel.is_main:
        fairness_before = _fairness_of_checkpoint(source, tok, args)
    report = quantize_checkpoint(
        source,
        args.out,
        config,
        tok,
        calib,
        args.device,
        DTYPES[args.dtype],
        args.max_shard_bytes,
        progress=not args.no_progress,
        export_format=args.format,
        eval_tokens=tokens,
        eval_seq_len=args.eval_seq_len,
        eval_windows=args.eval_windows,
        baseline=not args.skip_baseline,
        activation_budget=args.activation_budget,
        offload_dir=args.offload_dir,
        check_memory=not args.no_memory_check,
    )
    if not parallel.is_main:
        return {}
    out = Path(args.out)
    if args.fairness:
        fairness_after = _fairness_of_checkpoint(out, tok, args)
    layout = report.details["export"]["format"]
    storage = report.details["storage"]
    after, baseline = report.ppl, report.ppl_baseline
    seconds = time.perf_counter() - t0
    result = {
        "model": name,
        "method": config.method,
        "config": config.to_dict(),
        "bits": getattr(config, "bits", None),
        "group_size": getattr(config, "group_size", None),
        "sym": getattr(config, "sym", None),
        "out": str(out),
        "format": layout,
        "dtype": args.dtype,
        "ppl": after["ppl"] if after else None,
        "ppl_baseline": baseline["ppl"] if baseline else None,
        "eval_tokens": after["tokens"] if after else None,
        "bits_per_weight": storage["linear_bits"] / max(storage["linear_weights"], 1),
        "quantized_weights": storage["linear_weights"],
        "checkpoint_bytes": _dir_size(out),
        "fp_linear_bytes": storage["source_linear_bytes"],
        "quantized_linear_bytes": storage["linear_bits"] // 8,
        "quantize_seconds": report.seconds,
        "seconds": seconds,
        "block_seconds": report.block_seconds,
        "peak_rss_bytes": report.peak_rss_bytes,
        "peak_device_bytes": report.peak_device_bytes,
        "memory_plan": report.details["memory_plan"],
        "activations": report.details.get("activations"),
        "stereotype": fairness_after,
        "stereotype_baseline": fairness_before,
        "experts": report.details.get("experts"),
        "layers": [
            {"name": layer.name, "loss": layer.loss, "seconds": layer.seconds}
            for layer in report.layers
        ],
    }
    rows = [
        ("model", f"{name} (streamed block by block, {args.dtype} compute)"),
        ("method", config.describe()),
        (
            "quantized linears",
            f"{len(report.layers)} ({storage['linear_weights'] / 1e6:.1f} M weights)",
        ),
        ("bits / weight", f"{result['bits_per_weight']:.3f}"),
        (
            "linear weights",
            f"{storage['source_linear_bytes'] / 2**20:.1f} MiB -> "
            f"{storage['linear_bits'] / 8 / 2**20:.1f} MiB",
        ),
        ("checkpoint size", f"{result['checkpoint_bytes'] / 2**20:.1f} MiB"),
        ("ppl before", _fmt_ppl(result["ppl_baseline"])),
        ("ppl after", _fmt_ppl(result["ppl"])),
    ]
    if result["ppl"] and result["ppl_baseline"]:
        rows.append(("ppl change", f"{100 * (result['ppl'] / result['ppl_baseline'] - 1):+.2f} %"))
    if after:
        rows.append(("eval tokens", f"{after['tokens']} ({args.text})"))
    if args.fairness:
        rows.append(("stereotype score before", _fmt_fairness(fairness_before)))
        rows.append(("stereotype score after", _fmt_fairness(fairness_after)))
    losses = [layer.loss for layer in report.layers if layer.loss is not None]
    if losses:
        rows.append(("mean layer loss", f"{sum(losses) / len(losses):.4g}"))
    experts = report.details.get("experts")
    if experts:
        spread = experts["tokens_per_expert"]
        rows.append(
            (
                "calibration tokens / expert",
                f"min {spread['min']}, median {spread['median']}, max {spread['max']} "
                f"({experts['experts']} experts"
                + (", all tokens to all experts" if experts["calibrate_all_experts"] else "")
                + (", routing-weighted" if experts["routing_weighted_hessians"] else "")
                + ")",
            )
        )
        low = experts["under_min_tokens"]
        rows.append(
            (
                f"experts under {experts['min_tokens']} tokens",
                f"{len(low)}: identity Hessian (data-free rounding)" if low else "none",
            )
        )
    result["backends"], kernels_row = _kernel_backends()
    if kernels_row:
        rows.append(kernels_row)
    plan = report.details["memory_plan"]
    rows.append(("memory plan", f"{plan['total'] / 2**30:.2f} GiB host"))
    rows += _resource_rows(report.block_seconds, report.peak_rss_bytes, report.peak_device_bytes)
    spilled = report.details.get("activations", {}).get("spilled_written_bytes")
    if spilled:
        rows.append(("activations spilled", f"{spilled / 2**30:.2f} GiB to {args.offload_dir}"))
    rows += [
        ("quantize time", f"{report.seconds:.1f} s"),
        ("total time", f"{seconds:.1f} s"),
        ("output", f"{out} ({layout})"),
    ]
    _print_table("quantlab quantize", rows, to_stderr=args.json)
    return result


def _fairness_of_checkpoint(path: Path, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The stereotype score of the model at ``path`` (float or quantized), loaded whole: scoring
    sentence pairs needs the whole model in memory, unlike the streamed perplexity."""
    from quantlab.export.model_source import load_model

    loaded = load_model(str(path), args.dtype, args.device)
    return _eval_fairness(loaded.model, tokenizer, args)


def _resource_rows(
    block_seconds: list[float], peak_rss: int | None, peak_device: int | None
) -> list[tuple[str, str]]:
    rows = []
    if block_seconds:
        mean = sum(block_seconds) / len(block_seconds)
        rows.append(
            (
                "seconds / block",
                f"{mean:.2f} mean, {max(block_seconds):.2f} max ({len(block_seconds)} blocks)",
            )
        )
    if peak_rss is not None:
        rows.append(("peak host memory (RSS)", f"{peak_rss / 2**30:.2f} GiB"))
    if peak_device is not None:
        rows.append(("peak device memory", f"{peak_device / 2**30:.2f} GiB"))
    return rows


def _kernel_backends() -> tuple[dict[str, dict[str, str]], tuple[str, str] | None]:
    """The path each layer family's ops took in this run (kernel_policy), for --json and a row of
    the summary table; an unverified CUDA kernel or a torch fallback is visible in both."""
    from quantlab.ops.kernel_policy import backends_used

    used = backends_used()
    text = "; ".join(
        f"{family} {', '.join(f'{dev}: {b}' for dev, b in devices.items())}"
        for family, devices in used.items()
    )
    return used, (("kernels", text) if text else None)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of a model, streamed block by block from its checkpoint where its layout
    allows (float checkpoints, quantlab's, GPTQ and AWQ layouts), so a model larger than memory
    evaluates; the
    generation check and the stereotype score need the whole model and run only when it fits."""
    from transformers import AutoTokenizer

    from quantlab.calib.data import load_text, token_stream
    from quantlab.eval.generation import generate_text
    from quantlab.export.bitstack_checkpoint import is_bitstack_checkpoint
    from quantlab.export.fp8_source import is_float_source
    from quantlab.export.load import checkpoint_kind
    from quantlab.export.model_source import checkpoint_dtype, dtype_name, local_model_dir

    t0 = time.perf_counter()
    path, name = local_model_dir(args.model)
    if args.dtype == "auto":
        args.dtype = dtype_name(checkpoint_dtype(path, args.device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise OSError(f"could not load the tokenizer of {args.model!r}: {exc}") from exc
    tokens = token_stream(tokenizer, load_text(args.text))
    kind = checkpoint_kind(path)
    if args.memory_budget is not None and not is_bitstack_checkpoint(path):
        raise ValueError(
            f"--memory-budget applies to BitStack checkpoints, whose residual blocks load as a "
            f"prefix; {args.model} is {'a ' + kind if kind else 'a float'} checkpoint"
        )
    lazy = _open_lazily(path, kind, args)
    streamed = lazy is not None
    done = _streamed_ppl(lazy, tokens, args) if streamed else _resident_ppl(path, tokens, args)
    ppl, peak = done.ppl, done.peak
    sample = fairness = skipped = None
    if args.prompt or args.fairness:
        model = done.model
        if model is None:
            model, skipped = _whole_model_if_it_fits(path, args)
        if model is not None:
            sample = generate_text(model, tokenizer, args.prompt) if args.prompt else None
            if args.fairness:
                fairness = _eval_fairness(model, tokenizer, args)
    quantized = not is_float_source(kind)
    stored_bits, n_weights = done.storage
    result = {
        "model": name,
        "path": str(path),
        "quantized": quantized,
        "streamed": streamed,
        "ppl": ppl["ppl"],
        "eval_tokens": ppl["tokens"],
        # An unquantized model stores its linears in the compute dtype.
        "bits_per_weight": stored_bits / n_weights if n_weights else _dtype_bits(args.dtype),
        "memory_budget": args.memory_budget,
        "generation": sample,
        "stereotype": fairness,
        "skipped": skipped,
        "peak_rss_bytes": peak.rss_bytes,
        "peak_device_bytes": peak.device_bytes,
        "seconds": time.perf_counter() - t0,
    }
    how = "streamed block by block" if streamed else "whole model in memory"
    rows = [
        ("model", f"{name} ({'quantized' if quantized else 'unquantized'}; {how})"),
        ("text", args.text),
        ("ppl", _fmt_ppl(result["ppl"])),
        ("eval tokens", str(result["eval_tokens"])),
        ("bits / weight", f"{result['bits_per_weight']:.3f}"),
    ]
    if args.memory_budget is not None:
        rows.append(("memory budget", f"{args.memory_budget} (BitStack blocks loaded to fit)"))
    if fairness is not None:
        rows.append(("stereotype score", _fmt_fairness(fairness)))
    if sample is not None:
        rows.append(("generation", f"{args.prompt!r} -> {sample!r}"))
    if skipped is not None:
        rows.append(("skipped", skipped))
    result["backends"], kernels_row = _kernel_backends()
    if kernels_row:
        rows.append(kernels_row)
    if done.model is None and sample is not None:
        # The whole model was loaded after the streamed perplexity, for the generation check.
        rows.append(("peak host memory, perplexity", f"{peak.rss_bytes / 2**30:.2f} GiB"))
        from quantlab.resources import peak_rss_bytes

        run_peak, _ = peak_rss_bytes()
        result["run_peak_rss_bytes"] = run_peak
        rows.append(("peak host memory, run", f"{run_peak / 2**30:.2f} GiB"))
    else:
        rows += _resource_rows([], peak.rss_bytes, peak.device_bytes)
    rows.append(("time", f"{result['seconds']:.1f} s"))
    _print_table("quantlab eval", rows, to_stderr=args.json)
    return result


@dataclass
class _Evaluated:
    ppl: dict[str, Any]
    storage: tuple[int, int]  # stored bits of the quantized linears, their weight count
    peak: Any  # quantlab.resources.PeakMemory
    model: Any = None  # the whole model, when the evaluation loaded it


def _open_lazily(path: Path, kind: str | None, args: argparse.Namespace) -> Any:
    """The checkpoint at ``path`` as a LazyModel when its layout streams (float, quantlab, GPTQ,
    AWQ), else None."""
    from transformers import AutoConfig

    from quantlab.export.fp8_source import is_float_source, open_source_checkpoint
    from quantlab.export.lazy_model import LazyModel, empty_model
    from quantlab.export.load import open_checkpoint_lazily
    from quantlab.export.model_source import DTYPES

    dtype = DTYPES[args.dtype]
    if is_float_source(kind):
        model = empty_model(AutoConfig.from_pretrained(path), dtype)
        return LazyModel(model, open_source_checkpoint(path), args.device)
    return open_checkpoint_lazily(path, args.device, dtype, verify=not args.no_verify)


def _streamed_ppl(lazy: Any, tokens: Any, args: argparse.Namespace) -> _Evaluated:
    """Perplexity with one block of ``lazy`` (a LazyModel) in memory at a time."""
    from quantlab.calib.blocks import ModelBlocks
    from quantlab.eval.perplexity import blockwise_perplexity
    from quantlab.models.arch import resolve
    from quantlab.nn.registry import quantized_storage
    from quantlab.resources import PeakMemory

    spec = resolve(lazy.model, float_linears=False)
    blocks = ModelBlocks(
        lazy.model,
        spec.blocks,
        args.device,
        lazy,
        skip_for_capture=(spec.final_norm, spec.lm_head),
    )
    with PeakMemory(args.device) as peak:
        ppl = blockwise_perplexity(
            blocks, tokens, args.eval_seq_len, args.eval_windows, progress=not args.no_progress
        )
    lazy.weights.close()
    return _Evaluated(ppl.to_dict(), quantized_storage(lazy.model), peak)


def _resident_ppl(path: Path, tokens: Any, args: argparse.Namespace) -> _Evaluated:
    """Perplexity of the whole model loaded (layouts converted in memory: BitNet, BitStack);
    the loaded model is handed on for the generation check."""
    from quantlab.export.model_source import load_model
    from quantlab.nn.registry import quantized_storage
    from quantlab.resources import PeakMemory

    with PeakMemory(args.device) as peak:
        loaded = load_model(
            str(path), args.dtype, args.device, verify=not args.no_verify,
            memory_budget=args.memory_budget,
        )  # fmt: skip
        ppl = _eval_ppl(loaded.model, tokens, args)
    return _Evaluated(ppl, quantized_storage(loaded.model), peak, loaded.model)


def _whole_model_if_it_fits(path: Path, args: argparse.Namespace) -> tuple[Any, str | None]:
    """The whole model for the checks that need it, or None and why it was not loaded (it would
    not fit the memory available now)."""
    from quantlab.export.checkpoint_files import CheckpointFiles
    from quantlab.export.model_source import DTYPES, load_model
    from quantlab.resources import available_memory_bytes

    with CheckpointFiles(path) as files:
        size = files.resident_bytes(DTYPES[args.dtype])
    available = available_memory_bytes() if args.device == "cpu" else None
    if available is not None and size > 0.8 * available:
        what = "generation and stereotype score" if args.fairness else "generation"
        return None, (
            f"{what}: the whole model ({size / 2**30:.1f} GiB in {args.dtype}) does not fit the "
            f"{available / 2**30:.1f} GiB of memory available (perplexity was streamed)"
        )
    return load_model(str(path), args.dtype, args.device, verify=not args.no_verify).model, None


def _start_distributed(args: argparse.Namespace) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group, NCCL with one GPU per
    local rank for ``--device cuda``, gloo on CPUs. True if this call started it."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if args.command != "quantize":
        raise ValueError(
            f"quantlab {args.command} runs in one process; only quantize runs under torchrun"
        )
    if args.device.startswith("cuda"):
        if args.device == "cuda":  # one GPU per process on the node
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(args.device))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        print(GETTING_STARTED, end="")
        return 0
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"
    command = shlex.join(["quantlab", *(sys.argv[1:] if argv is None else argv)])
    started = False
    try:
        from quantlab.ops.kernel_policy import reset_usage

        started = _start_distributed(args)
        reset_usage()
        commands = {"quantize": lambda: cmd_quantize(args, command), "eval": lambda: cmd_eval(args)}
        commands["info"] = lambda: cmd_info(args)
        result = commands[args.command]()
    except (ValueError, FileNotFoundError, OSError, TypeError, RuntimeError, MemoryError) as exc:
        if os.environ.get("QUANTLAB_DEBUG"):
            raise
        rank = f" (rank {os.environ['RANK']})" if started else ""
        print(f"quantlab {args.command}: error{rank}: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if args.json and result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
