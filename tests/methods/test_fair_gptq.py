"""The fair-gptq method on a tiny random Llama: config, CLI options, what the term may change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from quantlab.calib.pairs import load_pairs, split_pairs
from quantlab.cli import _parser
from quantlab.config import GPTQConfig, config_from_dict
from quantlab.methods.fair_gptq import FairGPTQConfig, calibration_pairs, fair_layer_indices
from quantlab.methods.registry import get_method
from quantlab.pipeline import quantize_model
from tests.fairness_helpers import WordTokenizer


def _samples() -> torch.Tensor:
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


def _fresh(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_config_round_trip_and_validation() -> None:
    config = FairGPTQConfig(fair_alpha=0.5, fair_layers="0,2-3", fair_modules=["mlp.down_proj"])
    assert config_from_dict(config.to_dict()) == config
    assert config.gptq_config() == GPTQConfig()
    assert "alpha=0.5" in config.describe()
    for bad, match in [
        ({"fair_alpha": -0.1}, "fair_alpha must be a finite number >= 0"),
        ({"fair_layers": "top"}, "not a layer index or range"),
        ({"fair_layers": "3-1"}, "bad range"),
        ({"fair_modules": ()}, "fair_modules must be a non-empty list"),
        ({"fair_pairs_split": "test"}, "fair_pairs_split must be one of"),
        ({"fair_alignment": "greedy"}, "fair_alignment must be one of"),
        ({"fair_max_pairs": 0}, "fair_max_pairs must be >= 1"),
        ({"fair_pair_kind": "occupation"}, "fair_pair_kind must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            FairGPTQConfig(**bad)


def test_layer_presets_follow_the_reference() -> None:
    # 30 blocks: ceil(10%) = 3, rounded up to even = 4; lower-upper takes 2 at each end.
    assert fair_layer_indices("lower", 30) == [0, 1, 2, 3]
    assert fair_layer_indices("upper", 30) == [26, 27, 28, 29]
    assert fair_layer_indices("lower-upper", 30) == [0, 1, 28, 29]
    assert fair_layer_indices("all", 3) == [0, 1, 2]
    assert fair_layer_indices("1, 4-5", 30) == [1, 4, 5]
    with pytest.raises(ValueError, match="the model has 30 blocks"):
        fair_layer_indices("30", 30)


def test_cli_options_build_the_config() -> None:
    args = _parser().parse_args(
        [
            "quantize",
            "--method",
            "fair-gptq",
            "--out",
            "x",
            "--fair-alpha",
            "2",
            "--fair-layers",
            "lower",
            "--fair-modules",
            "self_attn.o_proj, mlp.down_proj",
            "--no-fair-sum-hessians",
            "--fair-alignment",
            "position",
            "--fair-pair-kind",
            "both",
        ]
    )
    config = get_method("fair-gptq").config_from_args(args)
    assert config == FairGPTQConfig(
        fair_alpha=2.0,
        fair_layers="lower",
        fair_modules=("self_attn.o_proj", "mlp.down_proj"),
        fair_sum_hessians=False,
        fair_alignment="position",
        fair_pair_kind="both",
    )


def test_calibration_pairs_by_kind(tmp_path: Path) -> None:
    group = calibration_pairs(FairGPTQConfig())
    target = calibration_pairs(FairGPTQConfig(fair_pair_kind="target"))
    both = calibration_pairs(FairGPTQConfig(fair_pair_kind="both"))
    assert group == split_pairs(load_pairs("quantlab"), "calib")
    assert target and both == group + target
    assert {p.template for p in target} <= {p.template for p in group}
    assert len(calibration_pairs(FairGPTQConfig(fair_pair_kind="both", fair_max_pairs=7))) == 7
    # A source without targets cannot be swapped: a clear error, not an empty calibration.
    csv_file = tmp_path / "crows.csv"
    csv_file.write_text(
        "sent_more,sent_less,stereo_antistereo,bias_type\n"
        "He is a nurse.,She is a nurse.,stereo,gender\n"
        "She can code.,He can code.,antistereo,gender\n"
    )
    config = FairGPTQConfig(
        fair_pairs=str(csv_file), fair_pairs_split="all", fair_pair_kind="target"
    )
    with pytest.raises(ValueError, match="needs pairs with a target column"):
        calibration_pairs(config)


def test_term_changes_only_the_debiased_linears_and_what_follows(tiny_llama: nn.Module) -> None:
    tok = WordTokenizer()
    x = _samples()
    plain = _fresh(tiny_llama)
    quantize_model(plain, GPTQConfig(), samples=x, progress=False)
    zero = _fresh(tiny_llama)
    quantize_model(zero, FairGPTQConfig(fair_alpha=0.0), tok, samples=x, progress=False)
    fair = _fresh(tiny_llama)
    config = FairGPTQConfig(fair_alpha=1.0, fair_layers="1", fair_modules=("self_attn.o_proj",))
    report = quantize_model(fair, config, tok, samples=x, progress=False)

    a, z, b = plain.state_dict(), zero.state_dict(), fair.state_dict()
    assert all(torch.equal(a[k], z[k]) for k in a)  # alpha = 0 is GPTQ, bit for bit
    changed = {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], b[k])}
    # Block 0 and block 1's q/k/v come before the debiased o_proj: untouched. o_proj changes, and
    # the MLP after it is quantized on its (changed) output.
    assert "model.layers.1.self_attn.o_proj" in changed
    assert not {c for c in changed if c.startswith("model.layers.0.")}
    assert not {c for c in changed if c.split(".")[-1] in ("q_proj", "k_proj", "v_proj")}
    details = report.details["fair-gptq"]
    assert details["layers"] == [1] and details["modules"] == ["self_attn.o_proj"]
    assert details["pairs"] == 612 and details["pair_positions"] > 612
    (row,) = details["debiased"]
    # alpha 1 removes most of the group-bias term: measured after / before = 0.036.
    assert row["bias_term_after"] < 0.07 * row["bias_term_before"], row


def test_bad_setups_are_clear_errors(tiny_llama: nn.Module) -> None:
    x = _samples()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        quantize_model(_fresh(tiny_llama), FairGPTQConfig(), samples=x, progress=False)
    with pytest.raises(ValueError, match=r"match no linear of a llama block"):
        config = FairGPTQConfig(fair_modules=("attn.c_proj",))
        quantize_model(_fresh(tiny_llama), config, WordTokenizer(), samples=x, progress=False)
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        config = FairGPTQConfig(fair_layers="5")
        quantize_model(_fresh(tiny_llama), config, WordTokenizer(), samples=x, progress=False)
