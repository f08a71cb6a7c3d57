"""The one pipeline, streamed: the bundled model (its first 6 blocks: the depth changes nothing
here) quantized block by block from its checkpoint
(parameters on the meta device, each block loaded when it is processed and put away after) gives
bit-identical packed weights to the same run on the model held in memory, for every method that
streams; what needs the whole model at once (BitStack's prefix distillation and measured-ppl
order) refuses at the start, saying why and what to use instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quantlab.config import CalibConfig
from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.lazy_model import LazyModel, empty_model
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_model

pytestmark = pytest.mark.model

# 4 windows of 128 tokens: enough for a non-singular Hessian per group, seconds per method.
CALIB = CalibConfig(n_samples=4, seq_len=128)


def _samples() -> torch.Tensor:
    return torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))


def _blocks_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.layers.state_dict().items()}


def _resident(
    path: Path, config: Any, tokenizer: Any
) -> tuple[dict[str, torch.Tensor], list[float | None], dict[str, Any]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = quantize_model(
        model, config, tokenizer, calib=CALIB, samples=_samples(), progress=False
    )
    return _blocks_state(model), [layer.loss for layer in report.layers], report.details


def _streamed(
    path: Path, config: Any, tokenizer: Any
) -> tuple[dict[str, torch.Tensor], list[float | None], int, dict[str, Any]]:
    lazy = LazyModel(empty_model(AutoConfig.from_pretrained(path)), CheckpointFiles(path))
    written: dict[str, torch.Tensor] = {}
    peak = [0]

    def sink(index: int, block: nn.Module) -> None:
        peak[0] = max(peak[0], lazy.loaded_bytes())
        for key, tensor in block.state_dict().items():
            written[f"{index}.{key}"] = tensor.clone()

    report = quantize_model(
        lazy.model,
        config,
        tokenizer,
        calib=CALIB,
        samples=_samples(),
        device="cpu",
        progress=False,
        weights=lazy,
        block_sink=sink,
    )
    # Every block went back to the meta device: nothing of the model is held after the run.
    assert lazy.loaded_bytes() == 0
    assert all(t.device.type == "meta" for t in lazy.model.model.layers.state_dict().values())
    return written, [layer.loss for layer in report.layers], peak[0], report.details


# The calibrated path (run_sequential) through GPTQ, the calibration-free one (ModelBlocks.open in
# each method's loop) through RTN, ternary and PVQ, AWQ's own block loop (RTN rounding) and its
# smoothing inside GPTQ's (GPTQ rounding), Fair-GPTQ's pair stream, PVQ's encoding choice from
# rows read off the checkpoint; the slow options (clip search, refits, PVQ's Hessian search, AWQ's
# full grid) only add solver time, which streaming does not touch.
_AWQ_FAST = {"n_grid": 4, "search_samples": 2, "scale_modes": ["duo"]}
CONFIGS = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64, "clip_search": False},
    "ternary": {"method": "ternary", "solver": "absmean"},
    # PVQ's pulse search is the slow part: the attention projections only.
    "pvq-fixed": {
        "method": "pvq",
        "dim": 8,
        "pulses": 6,
        "levels": 16,
        "hessian": False,
        "modules_to_not_convert": ["lm_head", "*.mlp.*"],
    },
    "pvq-chosen": {
        "method": "pvq",
        "bits_per_weight": 3.25,
        "dims": [8],
        "hessian": False,
        "modules_to_not_convert": ["lm_head", "*.mlp.*"],
    },
    "awq-rtn": {"method": "awq", "bits": 4, "group_size": 64, **_AWQ_FAST},
    "awq-gptq": {
        "method": "awq",
        "bits": 4,
        "group_size": 64,
        "rounding": "gptq",
        "clip_search": False,
        **_AWQ_FAST,
    },
    # Few residual blocks: the order (recorded in the config, not the tensors) is compared too.
    "bitstack": {"method": "bitstack", "n_blocks": 4, "rank": 2},
    "fair-gptq": {
        "method": "fair-gptq",
        "bits": 4,
        "group_size": 64,
        "clip_search": False,
        "fair_alpha": 1.0,
        "fair_layers": "4-5",
        "fair_max_pairs": 16,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_run_gives_bit_identical_packed_weights(
    short_default_model_path: Path, default_tokenizer: Any, name: str
) -> None:
    config = config_from_dict(CONFIGS[name])
    path = short_default_model_path
    want, want_losses, want_details = _resident(path, config, default_tokenizer)
    got, got_losses, peak, got_details = _streamed(path, config, default_tokenizer)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert got_losses == want_losses
    if name == "pvq-chosen":
        # The encoding was chosen from the same rows (read off the checkpoint when streamed).
        assert got_details["pvq"]["candidates"] == want_details["pvq"]["candidates"]
    if name.startswith("awq"):
        assert got_details["awq"]["maps"] == want_details["awq"]["maps"]
    if name == "bitstack":
        assert got_details["bitstack"]["order"] == want_details["bitstack"]["order"]
        assert (
            got_details["bitstack"]["stage_bytes_fp16"]
            == want_details["bitstack"]["stage_bytes_fp16"]
        )
    if name == "fair-gptq":
        assert got_details["fair-gptq"]["debiased"] == want_details["fair-gptq"]["debiased"]
        assert len(got_details["fair-gptq"]["debiased"]) == 4  # o_proj, down_proj x 2
    # One block (plus the constructor-made buffers) was ever loaded at a time: the largest
    # block's fp32 bytes, well under the model's.
    block_bytes = CheckpointFiles(path).nbytes("model.layers.0.")
    assert 0 < peak <= block_bytes


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"distill_steps": 10}, r"prefix distillation .* without it \(the paper's method\)"),
        ({"order": "ppl"}, r"measured-ppl order .* --bitstack-order hessian \(free"),
    ],
)
def test_whole_model_bitstack_options_refuse_to_stream_at_the_start(
    default_model_path: Path, options: dict, reason: str
) -> None:
    lazy = LazyModel(
        empty_model(AutoConfig.from_pretrained(default_model_path)),
        CheckpointFiles(default_model_path),
    )
    with pytest.raises(ValueError, match=reason):
        quantize_model(
            lazy.model,
            config_from_dict({"method": "bitstack", **options}),
            calib=CALIB,
            samples=_samples(),
            device="cpu",
            progress=False,
            weights=lazy,
        )
    assert lazy.loaded_bytes() == 0
