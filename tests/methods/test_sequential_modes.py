"""The calibrated methods with and without true-sequential solving on a tiny random Llama: both
modes run (the staged pass gives every group of a block its statistics from the float block),
and they differ exactly where true-sequential makes a group read its predecessors' quantized
output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_model

CONFIGS = [
    {"method": "gptq", "bits": 4, "group_size": 32},
    {"method": "ternary", "solver": "gptq"},
    {"method": "pvq", "dim": 8, "pulses": 6, "levels": 8},
]


@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=[c["method"] for c in CONFIGS])
def test_true_sequential_off_runs_and_changes_only_the_later_groups(
    tiny_llama: nn.Module, config: dict, batch_size: int | None
) -> None:
    from quantlab.config import CalibConfig

    samples = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibConfig(batch_size=batch_size)
    states = []
    for sequential in (True, False):
        model = copy.deepcopy(tiny_llama)
        options = {**config, "true_sequential": sequential}
        report = quantize_model(
            model, config_from_dict(options), samples=samples, calib=calib, progress=False
        )
        assert len(report.layers) == 14
        states.append(model.state_dict())
    on, off = states
    changed = {k.rsplit(".", 1)[0] for k in on if not torch.equal(on[k], off[k])}
    # Block 0's q/k/v read the embeddings either way: the same codes.
    first_group = {f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")}
    assert not changed & first_group
    # o_proj reads the attention output of quantized (true-sequential) or float q/k/v.
    assert "model.layers.0.self_attn.o_proj" in changed
