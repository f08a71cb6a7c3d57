"""Perplexity block by block (the streamed evaluation) against the whole-model forward, on tiny
models of every described family: resident and streamed from a saved checkpoint, the numbers are
the same to the last bit (each window runs through each block alone in both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from quantlab.calib.activations import ActivationStore
from quantlab.calib.blocks import ModelBlocks
from quantlab.eval.perplexity import WindowStream, blockwise_perplexity, perplexity
from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.lazy_model import LazyModel, empty_model
from quantlab.models.arch import resolve
from tests.families import FAMILIES, tiny_model

SEQ_LEN = 24


def _tokens(n: int = 3 * SEQ_LEN + 5) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(3))


def _blocks(model: torch.nn.Module, source: LazyModel | None = None) -> ModelBlocks:
    spec = resolve(model, float_linears=False)
    return ModelBlocks(
        model, spec.blocks, "cpu", source, skip_for_capture=(spec.final_norm, spec.lm_head)
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_blockwise_equals_the_whole_model(model_type: str, tmp_path: Path) -> None:
    model = tiny_model(model_type, gqa=True)
    want = perplexity(model, _tokens(), SEQ_LEN, None, progress=False)
    assert want.windows == 3

    resident = blockwise_perplexity(_blocks(model), _tokens(), SEQ_LEN, None, progress=False)
    assert resident.nll == want.nll and resident.tokens == want.tokens
    # The resident model is left as it was, with its blocks' own forwards.
    for block in model.get_submodule(resolve(model).blocks):
        assert "forward" not in vars(block)

    model.save_pretrained(tmp_path)
    lazy = LazyModel(empty_model(AutoConfig.from_pretrained(tmp_path)), CheckpointFiles(tmp_path))
    streamed = blockwise_perplexity(
        _blocks(lazy.model, lazy), _tokens(), SEQ_LEN, None, progress=False
    )
    assert streamed.nll == want.nll
    assert lazy.loaded_bytes() == 0  # every part went back to the meta device


def test_a_changed_block_changes_the_result() -> None:
    """The stored block outputs are what the head sees: a block that computes something else
    gives another perplexity (the replay is not a pass-through of the embedding)."""
    model = tiny_model("llama")
    want = blockwise_perplexity(_blocks(model), _tokens(), SEQ_LEN, None, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    got = blockwise_perplexity(_blocks(model), _tokens(), SEQ_LEN, None, progress=False)
    assert got.nll != want.nll
    assert got.nll == perplexity(model, _tokens(), SEQ_LEN, None, progress=False).nll


def test_the_stream_refuses_blocks_out_of_order() -> None:
    model = tiny_model("llama")
    blocks = _blocks(model)
    stream = WindowStream(_tokens(), SEQ_LEN, 2)
    with pytest.raises(RuntimeError, match="start"):
        stream.advance(0, model.model.layers[0], torch.device("cpu"))
    with blocks.outside_on_device():
        stream.start(model, blocks.blocks, blocks.device)
    with pytest.raises(RuntimeError, match="at block 0, not 1"):
        stream.advance(1, model.model.layers[1], torch.device("cpu"))
    stream.advance(0, model.model.layers[0], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="went through 1 of 2 blocks"):
        stream.finish(model, blocks.blocks, blocks.device)
    assert stream.nbytes == 2 * SEQ_LEN * 128 * 4  # two windows of hidden states, fp32


def test_windows_spilled_to_disk_give_the_same_result(tmp_path: Path) -> None:
    """Windows kept in an activation store past its budget are read back from disk at each
    block and at the head: same NLL to the last bit, and the files go with the store."""
    model = tiny_model("llama")
    want = perplexity(model, _tokens(), SEQ_LEN, None, progress=False)
    blocks = _blocks(model)
    with ActivationStore(0, tmp_path) as store:  # every window spills
        stream = WindowStream(_tokens(), SEQ_LEN, None, store=store)
        with blocks.outside_on_device():
            stream.start(model, blocks.blocks, blocks.device)
        for index in range(len(blocks)):
            with blocks.open(index) as block:
                stream.advance(index, block, blocks.device)
        assert store.spilled_bytes == stream.nbytes == 3 * SEQ_LEN * 128 * 4
        assert store.resident_bytes == 0
        with blocks.outside_on_device(with_head=True):
            got = stream.finish(model, blocks.blocks, blocks.device)
    assert got.nll == want.nll and got.tokens == want.tokens
    assert list(tmp_path.iterdir()) == []
