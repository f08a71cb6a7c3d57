"""Perplexity against bits per weight on the default model: PVQ at several rates, GPTQ W3/W4 g64
(docs/methods/pvq.md).

Bits per weight, the same for every method: all stored bits of the quantized block linears
(codes, scales, zero points, amplitude levels, rotation signs) over their weight count, as the
CLI reports it. Every point quantizes a fresh fp32 copy with the default calibration (32 x 512
tokens of wiki-calib, seed 0) and evaluates it on 10 x 2048 tokens of wiki-eval (PVQ layers with
their decoded weight cached, which changes nothing but speed).

Each point is written to the JSON atomically as soon as it is measured and points already there
are skipped, so an interrupted run resumes where it stopped; ``--plot-only`` redraws the figure.

Run: ``python scripts/pvq_curve.py --out out/pvq_curve`` (one PVQ point is a few minutes of
quantization plus a ~50 s evaluation on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_RATES = (3.25, 2.5, 4.0, 3.0, 2.75, 3.5, 2.25)
GPTQ_BITS = (3, 4)


def _write(path: Path, data: dict[str, Any]) -> None:
    from quantlab.export.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"points": {}}


def _fresh_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _bits_per_weight(model: torch.nn.Module) -> float:
    from quantlab.nn.registry import quantized_modules

    bits = weights = 0
    for _, m in quantized_modules(model):
        bits += m.storage_bits()
        weights += m.in_features * m.out_features
    return bits / weights


def _measure(
    key: str, model_path: Path, tok: Any, tokens: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    import quantlab
    from quantlab.config import CalibConfig
    from quantlab.eval.perplexity import perplexity
    from quantlab.nn.pvq_linear import PVQLinear

    model = _fresh_model(model_path)
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    point: dict[str, Any] = {"key": key}
    start = time.perf_counter()
    if key == "fp32":
        point.update(method="fp32", bits_per_weight=32.0)
    elif key.startswith("gptq"):
        bits = int(key.split("-w")[1].split("g")[0])
        report = quantlab.quantize(model, "gptq", tok, calib, bits=bits, group_size=64)
        point.update(method="gptq", bits=bits, group_size=64, quantize_seconds=report.seconds)
        point["bits_per_weight"] = _bits_per_weight(model)
    else:
        rate = float(key.split("-")[1])
        options: dict[str, Any] = {"bits_per_weight": rate}
        if args.hessian_search:
            options.update(hessian_search=True, search_moves=2)
        report = quantlab.quantize(model, "pvq", tok, calib, **options)
        for m in model.modules():
            if isinstance(m, PVQLinear):
                m.cache_weight()
        details = report.details["pvq"]
        point.update(
            method="pvq",
            target=rate,
            quantize_seconds=report.seconds,
            bits_per_weight=_bits_per_weight(model),
            **{f: details[f] for f in ("dim", "pulses", "levels", "code_bits")},
            hessian_search=args.hessian_search,
        )
    ppl = perplexity(model, tokens, args.eval_seq_len, args.eval_windows, progress=False)
    point.update(ppl=ppl.ppl, eval_tokens=ppl.tokens, seconds=time.perf_counter() - start)
    return point


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = data["points"].values()
    pvq = sorted((p for p in points if p["method"] == "pvq"), key=lambda p: p["bits_per_weight"])
    gptq = sorted((p for p in points if p["method"] == "gptq"), key=lambda p: p["bits_per_weight"])
    fp = [p for p in points if p["method"] == "fp32"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pvq:
        ax.plot(
            [p["bits_per_weight"] for p in pvq],
            [p["ppl"] for p in pvq],
            "o-",
            label="PVQ (Hessian-aware, rotated)",
        )
        for p in pvq:
            ax.annotate(
                f"D{p['dim']} P{p['pulses']} L{p['levels']}",
                (p["bits_per_weight"], p["ppl"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=7,
            )
    if gptq:
        ax.plot(
            [p["bits_per_weight"] for p in gptq],
            [p["ppl"] for p in gptq],
            "s--",
            label="GPTQ g64 (act-order, clip search)",
        )
        for p in gptq:
            ax.annotate(
                f"W{p['bits']}",
                (p["bits_per_weight"], p["ppl"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
    if fp:
        ax.axhline(fp[0]["ppl"], color="gray", linestyle=":", label=f"fp32 ({fp[0]['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all stored bits of the quantized linears)")
    ax.set_ylabel("wiki-eval perplexity (10 x 2048 tokens)")
    ax.set_title("SmolLM2-135M-Instruct: PVQ vs GPTQ")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/pvq_curve", help="directory of results.json")
    parser.add_argument("--plot", default="docs/img/pvq_curve.png")
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES))
    parser.add_argument("--gptq-bits", default=",".join(str(b) for b in GPTQ_BITS))
    parser.add_argument("--hessian-search", action="store_true", help="PVQ with pulse moves")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()

    results = Path(args.out) / "results.json"
    data = _load(results)
    if not args.plot_only:
        from transformers import AutoTokenizer

        from quantlab.calib.data import load_text, token_stream
        from quantlab.export.default_model import default_model_dir

        model_path = default_model_dir()
        tok = AutoTokenizer.from_pretrained(model_path)
        tokens = token_stream(tok, load_text("wiki-eval"))
        suffix = "-hs" if args.hessian_search else ""
        pvq_keys = [f"pvq-{float(r):g}{suffix}" for r in args.rates.split(",") if r]
        # The first rate (the headline one by default) comes before the baselines.
        keys = pvq_keys[:1] + [f"gptq-w{b}g64" for b in args.gptq_bits.split(",") if b]
        keys += ["fp32"] + pvq_keys[1:]
        for key in keys:
            if key in data["points"]:
                print(f"[pvq_curve] {key}: done before, skipped")
                continue
            point = _measure(key, model_path, tok, tokens, args)
            data["points"][key] = point
            data["machine"] = "2-core CPU, fp32 activations"
            data["date"] = time.strftime("%Y-%m-%d")
            _write(results, data)
            print(f"[pvq_curve] {key}: {json.dumps(point)}", flush=True)
    plot(data, Path(args.plot))
    print(f"[pvq_curve] wrote {args.plot}")


if __name__ == "__main__":
    main()
