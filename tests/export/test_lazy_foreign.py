"""GPTQ and AWQ checkpoints opened lazily: each block is converted to quantlab's groupwise layers
only when it is loaded, into exactly the layers the whole-model loader builds, so `quantlab eval`
streams them like quantlab's own layout; a block that does not convert is named when it loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantlab
from quantlab.calib.blocks import ModelBlocks
from quantlab.eval.perplexity import blockwise_perplexity, perplexity
from quantlab.export.awq_checkpoint import save_awq
from quantlab.export.errors import CheckpointError
from quantlab.export.gptq_checkpoint import save_gptq
from quantlab.export.lazy_model import LazyModel
from quantlab.export.load import open_checkpoint_lazily
from quantlab.models.arch import resolve
from tests.families import tiny_model

SEQ_LEN = 32


def _written(tmp_path: Path, fmt: str, sym: bool, model_type: str = "qwen2") -> Path:
    """A tiny model (qwen2: its q/k/v projections have biases) quantized with RTN and saved in
    layout ``fmt``."""
    model = tiny_model(model_type, gqa=True)
    with torch.no_grad():  # biases that are not all zero, so a lost or misplaced one shows
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    report = quantlab.quantize(model, "rtn", bits=4, group_size=32, sym=sym, progress=False)
    if fmt == "gptq":
        return save_gptq(model, tmp_path / fmt, report.config)[0]
    return save_awq(model, tmp_path / fmt, report.config)


def _blocks(lazy: LazyModel) -> ModelBlocks:
    spec = resolve(lazy.model, float_linears=False)
    return ModelBlocks(
        lazy.model, spec.blocks, "cpu", lazy, skip_for_capture=(spec.final_norm, spec.lm_head)
    )


@pytest.mark.parametrize(("fmt", "sym"), [("gptq", True), ("gptq", False), ("awq", False)])
def test_blocks_convert_as_they_load_into_the_whole_loaders_layers(
    tmp_path: Path, fmt: str, sym: bool
) -> None:
    out = _written(tmp_path, fmt, sym)
    whole = quantlab.load(str(out))
    want = whole.state_dict()
    lazy = open_checkpoint_lazily(out)
    assert lazy is not None and lazy.loaded_bytes() == 0
    blocks = lazy.model.get_submodule(resolve(lazy.model, float_linears=False).blocks)
    for index in range(len(blocks)):
        prefix = f"model.layers.{index}"
        block = lazy.load(prefix)
        got = block.state_dict()
        assert got.keys() == {k[len(prefix) + 1 :] for k in want if k.startswith(prefix + ".")}
        for key, tensor in got.items():
            assert tensor.dtype == want[f"{prefix}.{key}"].dtype, key
            assert torch.equal(tensor, want[f"{prefix}.{key}"]), key
        assert "self_attn.q_proj.bias" in got  # stored as it is, beside the converted tensors
        lazy.release(prefix)
        assert lazy.loaded_bytes() == 0

    # Perplexity block by block equals the whole loaded model's, to the last bit.
    tokens = torch.randint(0, 256, (3 * SEQ_LEN,), generator=torch.Generator().manual_seed(4))
    streamed = blockwise_perplexity(_blocks(lazy), tokens, SEQ_LEN, None, progress=False)
    assert streamed.nll == perplexity(whole, tokens, SEQ_LEN, None, progress=False).nll


def test_a_module_that_does_not_convert_is_named_when_its_block_loads(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = _written(tmp_path, "gptq", False)
    (out / "quantlab_checksums.json").unlink(missing_ok=True)
    state = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    state[f"{name}.qzeros"] = state[f"{name}.qzeros"][:1].contiguous()
    save_file(state, str(out / "model.safetensors"))
    lazy = open_checkpoint_lazily(out, verify=False)
    assert lazy is not None
    lazy.load("model.layers.0")  # the intact block loads
    with pytest.raises(CheckpointError, match=f"{name}: qzeros"):
        lazy.load("model.layers.1")

    del state[f"{name}.qzeros"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name} lacks"):
        open_checkpoint_lazily(out, verify=False)


def test_layouts_that_do_not_stream_open_as_none(tmp_path: Path) -> None:
    out = _written(tmp_path, "gptq", True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["quant_method"] = "bitnet"
    cfg_path.write_text(json.dumps(cfg))
    assert open_checkpoint_lazily(out, verify=False) is None
