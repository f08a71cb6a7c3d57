"""The one pipeline, streamed: the bundled model quantized block by block from its checkpoint
(parameters on the meta device, each block loaded when it is processed and put away after) gives
bit-identical packed weights to the same run on the model held in memory, for every method that
streams; the methods that cannot stream yet refuse at the start, saying why."""

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


def _resident(path: Path, config: Any) -> tuple[dict[str, torch.Tensor], list[float | None]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = quantize_model(model, config, calib=CALIB, samples=_samples(), progress=False)
    return _blocks_state(model), [layer.loss for layer in report.layers]


def _streamed(path: Path, config: Any) -> tuple[dict[str, torch.Tensor], list[float | None], int]:
    lazy = LazyModel(
        empty_model(AutoConfig.from_pretrained(path)), CheckpointFiles(path), torch.float32
    )
    written: dict[str, torch.Tensor] = {}
    peak = [0]

    def sink(index: int, block: nn.Module) -> None:
        peak[0] = max(peak[0], lazy.loaded_bytes())
        for key, tensor in block.state_dict().items():
            written[f"{index}.{key}"] = tensor.clone()

    report = quantize_model(
        lazy.model,
        config,
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
    return written, [layer.loss for layer in report.layers], peak[0]


# The calibrated path (run_sequential) through GPTQ, the calibration-free one (ModelBlocks.open in
# each method's loop) through RTN, ternary and PVQ; the slow options (clip search, refits, PVQ's
# Hessian search) only add solver time, which streaming does not touch.
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
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_run_gives_bit_identical_packed_weights(
    default_model_path: Path, name: str
) -> None:
    config = config_from_dict(CONFIGS[name])
    want, want_losses = _resident(default_model_path, config)
    got, got_losses, peak = _streamed(default_model_path, config)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert got_losses == want_losses
    # One block (plus the constructor-made buffers) was ever loaded at a time: the largest
    # block's fp32 bytes, well under the model's.
    block_bytes = CheckpointFiles(default_model_path).nbytes("model.layers.0.")
    assert 0 < peak <= block_bytes


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"method": "awq"}, "its scale search does not stream"),
        ({"method": "bitstack"}, "its decomposition is not streamed yet"),
        ({"method": "pvq"}, "give --pvq-dim, --pvq-pulses and --pvq-levels to stream"),
        ({"method": "fair-gptq"}, "its paired capture does not stream"),
    ],
)
def test_methods_that_cannot_stream_refuse_at_the_start(
    default_model_path: Path, config: dict, reason: str
) -> None:
    lazy = LazyModel(
        empty_model(AutoConfig.from_pretrained(default_model_path)),
        CheckpointFiles(default_model_path),
        torch.float32,
    )
    with pytest.raises(ValueError, match=reason):
        quantize_model(
            lazy.model,
            config_from_dict(config),
            calib=CALIB,
            samples=_samples(),
            device="cpu",
            progress=False,
            weights=lazy,
        )
    assert lazy.loaded_bytes() == 0
