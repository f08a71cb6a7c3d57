"""Fair-GPTQ against plain GPTQ on the bundled model: wiki ppl and stereotype score, as JSON.

Every configuration quantizes a fresh copy of the default model with the same bits, group size and
calibration text (W4 g64, 32 x 512 tokens of wiki-calib, seed 0), then measures

* wiki-eval perplexity over 10 x 2048 tokens (the project's headline figure), and
* the stereotype score on the *held-out* half of the shipped pair set (Fair-GPTQ calibrates on the
  other half; the halves share no template), plus any ``--extra-pairs`` sets.

Results go to ``--out`` (JSON, rewritten atomically after every configuration); a configuration
already in the file with the same settings is skipped, so an interrupted run resumes. At the end
(and with ``--report-only``) every Fair-GPTQ configuration is compared with GPTQ on the same pairs
(exact McNemar test, template-bootstrap 95% interval of the score difference).

    python scripts/fair_gptq_experiment.py --out out/fair_gptq/results.json
    python scripts/fair_gptq_experiment.py --configs gptq,fair-a1 --extra-pairs \\
        crows=/path/to/crows_pairs_anonymized.csv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quantlab.calib.data import load_text, token_stream
from quantlab.calib.pairs import load_pairs, shipped_pairs_path, split_pairs
from quantlab.config import CalibConfig, GPTQConfig
from quantlab.eval.fairness import PairScore, StereotypeResult, compare_scores, stereotype_score
from quantlab.eval.perplexity import perplexity
from quantlab.export.atomic import atomic_write_text
from quantlab.methods.fair_gptq import FairGPTQConfig
from quantlab.pipeline import quantize_model

__all__ = ["CONFIGS", "main"]

# name -> method options on top of W4 g64 and the GPTQ defaults (act-order, clip search).
CONFIGS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "gptq": {"method": "gptq"},
    "fair-a0.1": {"fair_alpha": 0.1},
    "fair-a0.3": {"fair_alpha": 0.3},
    "fair-a1": {"fair_alpha": 1.0},
    "fair-a10": {"fair_alpha": 10.0},
    "fair-a1-lower": {"fair_alpha": 1.0, "fair_layers": "lower"},
    "fair-a1-upper": {"fair_alpha": 1.0, "fair_layers": "upper"},
    "fair-a1-lower-upper": {"fair_alpha": 1.0, "fair_layers": "lower-upper"},
    "fair-a10-lower": {"fair_alpha": 10.0, "fair_layers": "lower"},
    "fair-a10-upper": {"fair_alpha": 10.0, "fair_layers": "upper"},
    "fair-a1-first-order": {"fair_alpha": 1.0, "fair_sum_hessians": False},
    "fair-a1-position": {"fair_alpha": 1.0, "fair_alignment": "position"},
    "fair-a1-pairs-in-h": {"fair_alpha": 1.0, "fair_pairs_in_hessian": True},
    "fair-a1-all-linears": {"fair_alpha": 1.0, "fair_modules": ("*",)},
    "fair-target-a0.05": {"fair_alpha": 0.05, "fair_pair_kind": "target"},
    "fair-target-a0.1": {"fair_alpha": 0.1, "fair_pair_kind": "target"},
    "fair-target-a1": {"fair_alpha": 1.0, "fair_pair_kind": "target"},
    "fair-target-a0.3": {"fair_alpha": 0.3, "fair_pair_kind": "target"},
    "fair-target-a1-upper": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_layers": "upper"},
    "fair-target-a1-lower": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_layers": "lower"},
    "fair-target-a1-suffix": {
        "fair_alpha": 1.0,
        "fair_pair_kind": "target",
        "fair_alignment": "suffix",
    },
    "fair-target-a1-pairs-in-h": {
        "fair_alpha": 1.0,
        "fair_pair_kind": "target",
        "fair_pairs_in_hessian": True,
    },
    "fair-target-a1-rank1": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_rank": 1},
    "fair-target-a1-rank1-all-linears": {
        "fair_alpha": 1.0,
        "fair_pair_kind": "target",
        "fair_rank": 1,
        "fair_modules": ("*",),
    },
    "fair-target-a3-rank1": {"fair_alpha": 3.0, "fair_pair_kind": "target", "fair_rank": 1},
    "fair-target-a10-rank1": {"fair_alpha": 10.0, "fair_pair_kind": "target", "fair_rank": 1},
    "fair-target-a1-rank2": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_rank": 2},
    "fair-both-a1-rank1": {"fair_alpha": 1.0, "fair_pair_kind": "both", "fair_rank": 1},
    "fair-a1-rank1": {"fair_alpha": 1.0, "fair_rank": 1},
    "fair-target-a1-rank4": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_rank": 4},
    "fair-target-a1-rank16": {"fair_alpha": 1.0, "fair_pair_kind": "target", "fair_rank": 16},
    "fair-target-a10-rank4": {"fair_alpha": 10.0, "fair_pair_kind": "target", "fair_rank": 4},
    "fair-target-a3-upper": {"fair_alpha": 3.0, "fair_pair_kind": "target", "fair_layers": "upper"},
    "fair-both-a1": {"fair_alpha": 1.0, "fair_pair_kind": "both"},
}
DEFAULT_RUN = ("fp32", "gptq", "fair-a0.1", "fair-a1", "fair-a1-upper", "fair-a1-lower")


def _config(options: dict[str, Any]) -> GPTQConfig:
    options = dict(options)
    if options.pop("method", "fair-gptq") == "gptq":
        return GPTQConfig(bits=4, group_size=64, **options)
    return FairGPTQConfig(bits=4, group_size=64, **options)


def _result_from_dict(d: dict[str, Any]) -> StereotypeResult:
    return StereotypeResult(
        score=d["score"],
        n_pairs=d["n_pairs"],
        ci95=tuple(d["ci95"]),
        by_category=d["by_category"],
        by_order=d.get("by_order", {}),
        mean_margin=d["mean_margin"],
        normalization=d["normalization"],
        seconds=d["seconds"],
        pairs=[PairScore(**p) for p in d["pairs"]],
    )


def _settings(name: str, args: argparse.Namespace) -> dict[str, Any]:
    options = CONFIGS[name]
    return {
        "config": None if options is None else _config(options).to_dict(),
        "calib": CalibConfig().to_dict(),
        "eval": {"text": "wiki-eval", "windows": 10, "seq_len": 2048},
        "pairs": {
            "source": "quantlab",
            "split": "heldout",
            "normalization": args.normalization,
            "sha1": hashlib.sha1(shipped_pairs_path().read_bytes()).hexdigest(),
        },
        "extra_pairs": sorted(args.extra_pairs),
        "extra_bias_types": args.extra_bias_types,
    }


def _quantized_model(
    name: str, path: Path, tok: Any, save_dir: Path | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Quantize the default model with ``name``'s config, or load it from ``save_dir`` when an
    earlier run saved it with the same config."""
    from transformers import AutoModelForCausalLM

    import quantlab
    from quantlab.export.quantlab_checkpoint import save_quantized

    config = _config(CONFIGS[name])  # type: ignore[arg-type]
    saved = save_dir / name if save_dir is not None else None
    if saved is not None and (saved / "quantlab_report.json").is_file():
        report = json.loads((saved / "quantlab_report.json").read_text())
        if report.get("config") == config.to_dict():
            print(f"{name}: loading the quantized model from {saved}", flush=True)
            return quantlab.load(str(saved)), report
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = quantize_model(model, config, tok, CalibConfig(), progress=True).to_dict()
    if saved is not None:
        save_quantized(model, saved, config.method, config.to_dict(), tok, report)
    return model, report


def _run_one(name: str, args: argparse.Namespace, eval_sets: dict[str, list]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.export.default_model import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    entry: dict[str, Any] = {"settings": _settings(name, args)}
    if CONFIGS[name] is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        model, report = _quantized_model(name, path, tok, args.save_dir)
        entry["quantize_seconds"] = report["seconds"]
        entry["details"] = report["details"]
        entry["layer_losses"] = {layer["name"]: layer["loss"] for layer in report["layers"]}
    tokens = token_stream(tok, load_text("wiki-eval"))
    entry["ppl"] = perplexity(model, tokens, 2048, 10).to_dict()
    entry["stereotype"] = {}
    for set_name, pairs in eval_sets.items():
        result = stereotype_score(
            model, tok, pairs, batch_size=32, normalization=args.normalization, progress=True
        )
        entry["stereotype"][set_name] = result.to_dict(include_pairs=True)
    return entry


def _report(results: dict[str, Any]) -> dict[str, Any]:
    """Every configuration against GPTQ (and fp32) on each pair set."""
    summary: dict[str, Any] = {}
    base = results.get("gptq")
    for name, entry in results.items():
        row: dict[str, Any] = {"ppl": entry["ppl"]["ppl"]}
        if base is not None:
            row["ppl_vs_gptq"] = entry["ppl"]["ppl"] / base["ppl"]["ppl"] - 1
        for set_name, d in entry["stereotype"].items():
            row[set_name] = {"score": d["score"], "ci95": d["ci95"], "by_category": {}}
            row[set_name]["by_category"] = {k: v["score"] for k, v in d["by_category"].items()}
            row[set_name]["by_order"] = {k: v["score"] for k, v in d.get("by_order", {}).items()}
            if base is not None and name != "gptq" and set_name in base["stereotype"]:
                cmp = compare_scores(
                    _result_from_dict(base["stereotype"][set_name]), _result_from_dict(d)
                )
                row[set_name]["vs_gptq"] = cmp.to_dict()
        summary[name] = row
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    for name, row in summary.items():
        parts = [f"{name:24s} ppl {row['ppl']:.3f}"]
        if "ppl_vs_gptq" in row:
            parts.append(f"({100 * row['ppl_vs_gptq']:+.2f}% vs gptq)")
        for set_name, d in row.items():
            if not isinstance(d, dict):
                continue
            text = f"{set_name} SS {100 * d['score']:.1f}%"
            if d.get("by_order"):
                text += (
                    " (" + ", ".join(f"{k} {100 * v:.1f}" for k, v in d["by_order"].items()) + ")"
                )
            if "vs_gptq" in d:
                v = d["vs_gptq"]
                text += (
                    f" [{100 * v['difference']:+.1f} pt, CI {100 * v['ci95'][0]:+.1f}.."
                    f"{100 * v['ci95'][1]:+.1f}, McNemar p={v['mcnemar_p']:.3f}]"
                )
            parts.append(text)
        print("  ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/fair_gptq/results.json"))
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_RUN),
        help=f"comma-separated, from: {', '.join(CONFIGS)}",
    )
    parser.add_argument("--normalization", default="sum", choices=["sum", "mean"])
    parser.add_argument(
        "--extra-pairs",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="another pair set to score (all of it), e.g. crows=crows_pairs_anonymized.csv",
    )
    parser.add_argument(
        "--extra-bias-types",
        default="gender,race-color,religion",
        help="keep only these bias types of the extra sets ('' = all)",
    )
    parser.add_argument(
        "--save-dir",
        type=Path,
        default=Path("out/fair_gptq/models"),
        help="quantized checkpoints are saved here and reused by later runs with the same config",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.report_only:
        eval_sets = {"heldout": split_pairs(load_pairs("quantlab"), "heldout")}
        keep = {t for t in args.extra_bias_types.split(",") if t}
        for spec in args.extra_pairs:
            set_name, _, source = spec.partition("=")
            pairs = load_pairs(source)
            eval_sets[set_name] = [p for p in pairs if not keep or p.bias_type in keep]
        for name in names:
            if name in results and results[name].get("settings") == _settings(name, args):
                print(f"{name}: already done, skipped")
                continue
            start = time.perf_counter()
            results[name] = _run_one(name, args, eval_sets)
            results[name]["seconds"] = time.perf_counter() - start
            results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
            atomic_write_text(args.out, json.dumps(results, indent=1))
            print(f"{name}: done in {results[name]['seconds']:.0f} s", flush=True)
    summary = _report(results)
    atomic_write_text(
        args.out.with_name(args.out.stem + "_summary.json"), json.dumps(summary, indent=1)
    )
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
