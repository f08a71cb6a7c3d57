"""Perplexity against memory on the default model: BitStack at many budgets, GPTQ W2/W3/W4 g64 and
AWQ W3/W4 g64 at theirs (docs/methods/bitstack.md).

Memory convention, the same for every method: the bytes of every tensor of the checkpoint with
float tensors at 2 bytes per element (fp16 deployment: embeddings, norms, fp16 scales and factors)
and integer tensors as stored (packed codes, zero points, signs); the tied head counts once.
BitStack configurations are chosen with the same convention
(``load_bitstack(..., accounting_dtype=torch.float16)``); evaluation runs in fp32.

The BitStack checkpoint is decomposed once (``--blocks``/``--rank``) and then loaded at each
budget; the budgets are the peers' memory points plus every whole-block stage up to
``--max-stage``. Every point is written to the JSON atomically as soon as it is measured, and
points already in the JSON are skipped, so an interrupted run resumes where it stopped.

Run: ``python scripts/bitstack_curve.py --out out/bitstack_curve`` (about an hour on 2 idle
cores with full evaluations), then ``--plot-only`` to redraw ``docs/img/bitstack_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

PEERS = {
    "gptq-w2g64": ("gptq", 2),
    "gptq-w3g64": ("gptq", 3),
    "gptq-w4g64": ("gptq", 4),
    "awq-w3g64": ("awq", 3),
    "awq-w4g64": ("awq", 4),
}


def _write(path: Path, data: dict[str, Any]) -> None:
    from quantlab.export.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"points": {}}


def _fresh_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ppl(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> float:
    from quantlab.eval.perplexity import perplexity

    return perplexity(model, tokens, args.eval_seq_len, args.eval_windows, progress=False).ppl


def _run_name(args: argparse.Namespace) -> str:
    signs = "plain" if args.no_feedback else "feedback"
    name = f"bitstack-b{args.blocks}-r{args.rank}-{args.order}-{signs}-a{args.alpha:g}"
    if args.replay_blocks:
        name += f"-replay{args.replay_blocks}"
    if args.distill_steps:
        name += f"-distill{args.distill_blocks}x{args.distill_steps}"
    return name


def _run_label(run_name: str) -> str:
    parts = ["sign(residual)" if "-plain" in run_name else "error-feedback signs"]
    if "-a" in run_name:
        parts.append("alpha " + run_name.split("-a", 1)[1].split("-")[0])
    if "replay" in run_name:
        parts.append("replay")
    if "distill" in run_name:
        parts.append("distilled prefix")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    import quantlab
    from quantlab.calib.data import load_text, token_stream
    from quantlab.config import CalibConfig
    from quantlab.export.bitstack_checkpoint import (
        checkpoint_memory_bytes,
        load_bitstack,
        plan_from_checkpoint,
    )
    from quantlab.export.default_model import default_model_dir
    from quantlab.export.quantlab_checkpoint import save_quantized

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "curve.json"
    data = _load_json(json_path)
    data["settings"] = {
        "blocks": args.blocks,
        "rank": args.rank,
        "order": args.order,
        "eval": f"wiki-eval {args.eval_windows} x {args.eval_seq_len}",
        "calib": f"wiki-calib {args.calib_samples} x {args.calib_seq_len}",
        "bitstack_calib": f"wiki-calib {args.bitstack_calib_samples or args.calib_samples} x "
        f"{args.calib_seq_len}",
        "memory": "float tensors at 2 bytes, integer tensors as stored",
    }
    points: dict[str, Any] = data["points"]
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = token_stream(tok, load_text("wiki-eval"))
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)

    def record(name: str, point: dict[str, Any]) -> None:
        points[name] = point | {"date": time.strftime("%Y-%m-%d %H:%M")}
        _write(json_path, data)
        print(
            f"[curve] {name}: {point['memory_bytes'] / 1e6:.2f} MB ppl {point['ppl']:.3f}",
            flush=True,
        )

    known = dict(item.split("=", 1) for item in args.known)
    for name, ppl in known.items():
        if name in points or name == "fp16":
            continue
        # A figure measured elsewhere with the same calibration and evaluation: its memory is
        # that of an RTN checkpoint of the same bits and group size (the same tensors).
        method, bits = PEERS[name]
        model = _fresh_model(model_dir)
        quantlab.quantize(model, "rtn", bits=bits, group_size=64, progress=False)
        save_quantized(model, out / f"layout-w{bits}g64", "rtn", {"method": "rtn"}, tok)
        record(
            name,
            {
                "method": method,
                "bits": bits,
                "ppl": float(ppl),
                "source": args.source,
                "memory_bytes": checkpoint_memory_bytes(out / f"layout-w{bits}g64"),
            },
        )
    if "fp16" not in points and not args.skip_baseline:
        model = _fresh_model(model_dir)
        n_float = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
        tied = model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0
        if "fp16" in known:
            record(
                "fp16",
                {
                    "method": "fp16",
                    "memory_bytes": 2 * (n_float - tied),
                    "ppl": float(known["fp16"]),
                    "source": args.source,
                },
            )
        else:
            record(
                "fp16",
                {
                    "method": "fp16",
                    "memory_bytes": 2 * (n_float - tied),
                    "ppl": _ppl(model, tokens, args),
                },
            )

    for name in args.peers:
        method, bits = PEERS[name]
        if name in points or name in known:
            continue
        ckpt = out / name
        model = _fresh_model(model_dir)
        t0 = time.perf_counter()
        report = quantlab.quantize(
            model, method, tokenizer=tok, calib=calib, bits=bits, group_size=64, progress=False
        )
        seconds = time.perf_counter() - t0
        save_quantized(model, ckpt, method, report.config, tok)
        record(
            name,
            {
                "method": method,
                "bits": bits,
                "quantize_seconds": seconds,
                "memory_bytes": checkpoint_memory_bytes(ckpt),
                "ppl": _ppl(model, tokens, args),
            },
        )
        del model

    bs_dir = out / _run_name(args)
    if not (bs_dir / "config.json").is_file():
        model = _fresh_model(model_dir)
        t0 = time.perf_counter()
        bs_calib = CalibConfig(
            n_samples=args.bitstack_calib_samples or args.calib_samples, seq_len=args.calib_seq_len
        )
        report = quantlab.quantize(
            model,
            "bitstack",
            tokenizer=tok,
            calib=bs_calib,
            n_blocks=args.blocks,
            rank=args.rank,
            order=args.order,
            order_max_stage=args.order_max_stage,
            error_feedback=not args.no_feedback,
            scale_alpha=args.alpha,
            replay_blocks=args.replay_blocks,
            distill_steps=args.distill_steps,
            distill_blocks=args.distill_blocks,
            progress=True,
        )
        data.setdefault("bitstack_runs", {})[bs_dir.name] = {
            "calib": f"wiki-calib {bs_calib.n_samples} x {bs_calib.seq_len}",
            "quantize_seconds": time.perf_counter() - t0,
            "svd_seconds": report.details["bitstack"]["svd_seconds"],
            "order_seconds": report.details["bitstack"]["order_seconds"],
        }
        save_quantized(model, bs_dir, "bitstack", report.config, tok, report.to_dict())
        _write(json_path, data)
        del model
    plan = plan_from_checkpoint(bs_dir, torch.float16)
    budgets: dict[str, int] = {}
    for peer in PEERS:  # one BitStack point per distinct peer memory (AWQ and GPTQ share them)
        if peer in points and points[peer]["memory_bytes"] not in budgets.values():
            budgets[f"{bs_dir.name}@{peer}"] = points[peer]["memory_bytes"]
    stage, steps = 0, 0
    counts = plan.blocks_at(0)
    while stage < args.max_stage:
        stage += 1
        # The configuration where every layer holds `stage` blocks.
        steps = sum(1 for _, b in plan.order if b < stage)
        counts = plan.blocks_at(steps)
        if min(counts.values()) < stage:
            break
        budgets[f"{bs_dir.name}@stage{stage}"] = plan.config_bytes(steps)
    for name, budget in sorted(budgets.items(), key=lambda kv: kv[1]):
        if name in points or budget < plan.base_bytes:
            continue
        model = load_bitstack(bs_dir, budget, accounting_dtype=torch.float16)
        steps = model.bitstack_source.steps
        record(
            name,
            {
                "method": "bitstack",
                "run": bs_dir.name,
                "budget_bytes": budget,
                "steps": steps,
                "memory_bytes": plan.config_bytes(steps),
                "mean_blocks": sum(plan.blocks_at(steps).values()) / len(plan.modules),
                "ppl": _ppl(model, tokens, args),
            },
        )
        del model


def compare_orders(args: argparse.Namespace) -> None:
    """Re-order the curve's decomposition by other criteria (no new decomposition) and evaluate
    every order at the peers' memory points on ``--compare-windows`` windows."""
    from transformers import AutoTokenizer

    from quantlab.calib.data import load_text, token_stream
    from quantlab.config import CalibConfig
    from quantlab.export.bitstack_checkpoint import load_bitstack
    from quantlab.export.default_model import default_model_dir
    from quantlab.export.quantlab_checkpoint import save_quantized
    from quantlab.methods.base import MethodContext
    from quantlab.methods.bitstack.config import BitStackConfig
    from quantlab.methods.bitstack.ordering import order_blocks
    from quantlab.pipeline import QuantizationReport

    out = Path(args.out)
    json_path = out / "curve.json"
    data = _load_json(json_path)
    points = data["points"]
    bs_dir = out / _run_name(args)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tokens = token_stream(tok, load_text("wiki-eval"))
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    errors = json.loads((bs_dir / "quantlab_report.json").read_text())["details"]["bitstack"][
        "output_errors"
    ]
    comparisons = data.setdefault("orders", {})
    variants = {
        "hessian-relative": ("hessian", "relative"),
        "hessian-absolute": ("hessian", "absolute"),
        "ppl": ("ppl", "relative"),
    }
    for variant, (order, normalize) in variants.items():
        dst = bs_dir if variant == "hessian-relative" else out / f"{bs_dir.name}-as-{variant}"
        if not (dst / "config.json").is_file():
            model = load_bitstack(bs_dir)
            config = BitStackConfig(
                n_blocks=args.blocks, rank=args.rank, order=order, order_normalize=normalize,
                order_max_stage=args.order_max_stage,
            )  # fmt: skip
            report = QuantizationReport("bitstack", config.to_dict(), None)
            ctx = MethodContext(tok, calib, report, torch.device("cpu"), True)
            t0 = time.perf_counter()
            order_blocks(model, config, ctx, errors)
            comparisons.setdefault("seconds", {})[variant] = time.perf_counter() - t0
            save_quantized(model, dst, "bitstack", config.to_dict(), tok)
            _write(json_path, data)
        for peer in args.peers:
            if peer not in points:
                continue
            key = f"{variant}@{peer}"
            if key in comparisons:
                continue
            model = load_bitstack(dst, points[peer]["memory_bytes"], accounting_dtype=torch.float16)
            from quantlab.eval.perplexity import perplexity

            ppl = perplexity(model, tokens, args.eval_seq_len, args.compare_windows, progress=False)
            comparisons[key] = {"ppl": ppl.ppl, "windows": args.compare_windows,
                                "steps": model.bitstack_source.steps}  # fmt: skip
            _write(json_path, data)
            print(f"[orders] {key}: ppl {ppl.ppl:.3f}", flush=True)


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _load_json(Path(args.out) / "curve.json")
    points = data["points"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        "bitstack": ("o-", "BitStack"),
        "gptq": ("s--", "GPTQ g64"),
        "awq": ("^--", "AWQ g64"),
    }
    runs = sorted({p.get("run", "") for p in points.values() if p["method"] == "bitstack"})
    for run_name in runs:
        rows = sorted(
            (p["memory_bytes"] / 1e6, p["ppl"])
            for p in points.values()
            if p["method"] == "bitstack" and p.get("run", "") == run_name
        )
        ax.plot(*zip(*rows, strict=True), "o-", label=f"BitStack, {_run_label(run_name)}")
    for method, (style, label) in styles.items():
        if method == "bitstack":
            continue
        rows = sorted(
            (p["memory_bytes"] / 1e6, p["ppl"]) for p in points.values() if p["method"] == method
        )
        if rows:
            ax.plot(*zip(*rows, strict=True), style, label=label)
            if method != "bitstack":
                for p in points.values():
                    if p["method"] == method:
                        ax.annotate(
                            f"W{p['bits']}",
                            (p["memory_bytes"] / 1e6, p["ppl"]),
                            textcoords="offset points",
                            xytext=(4, 4),
                            fontsize=8,
                        )
    if "fp16" in points:
        ax.axhline(
            points["fp16"]["ppl"],
            color="gray",
            lw=0.8,
            ls=":",
            label=f"fp32 ({points['fp16']['memory_bytes'] / 1e6:.0f} MB at fp16)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("model memory, MB (float tensors at fp16, packed tensors as stored)")
    ax.set_ylabel("wiki-eval perplexity (log)")
    s = data.get("settings", {})
    ax.set_title(
        f"SmolLM2-135M: BitStack ({s.get('blocks')} blocks x rank {s.get('rank')}, "
        f"{s.get('order')} order) vs GPTQ/AWQ",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"[curve] wrote {args.plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/bitstack_curve")
    p.add_argument("--plot", default="docs/img/bitstack_curve.png")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument(
        "--compare-orders",
        action="store_true",
        help="re-order the decomposition (hessian absolute, measured ppl) and evaluate each order "
        "at the peers' memory points",
    )
    p.add_argument("--compare-windows", type=int, default=2, help="eval windows per comparison")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--order", default="hessian", choices=["hessian", "ppl"])
    p.add_argument("--order-max-stage", type=int, default=None)
    p.add_argument("--max-stage", type=int, default=6, help="whole-block stages to evaluate")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--no-feedback",
        action="store_true",
        help="decompose with the paper's sign(residual) rule instead of error-feedback signs",
    )
    p.add_argument(
        "--known",
        nargs="*",
        default=[],
        metavar="NAME=PPL",
        help="record peer (or fp16) points measured elsewhere with the same calibration and "
        "evaluation instead of re-running them (their memory is computed here)",
    )
    p.add_argument("--source", default="docs/results.md", help="where --known figures come from")
    p.add_argument("--alpha", type=float, default=0.5, help="activation-scale exponent")
    p.add_argument("--replay-blocks", type=int, default=0, help="compressed-input replay target")
    p.add_argument("--distill-steps", type=int, default=0, help="prefix distillation steps")
    p.add_argument("--distill-blocks", type=int, default=2, help="prefix distillation target")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument(
        "--bitstack-calib-samples",
        type=int,
        default=None,
        help="calibration windows for the BitStack decomposition (default: --calib-samples)",
    )
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=10)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    args = p.parse_args()
    if args.compare_orders:
        compare_orders(args)
        return
    if not args.plot_only:
        torch.manual_seed(0)
        run(args)
    plot(args)


if __name__ == "__main__":
    main()
