"""Activations between blocks: in RAM up to the budget, spilled to memory-mapped files beyond
it, read back bit for bit, and the files gone with their tensors; a run that spills quantizes
exactly as one that does not."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch

from quantlab.calib.activations import ActivationStore, SpilledTensor, materialize
from quantlab.config import CalibConfig
from quantlab.methods.registry import config_from_dict
from quantlab.pipeline import quantize_model
from tests.families import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (0, 4), (2, 129, 64)])
def test_a_spilled_tensor_reads_back_exactly(
    tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(1)
    tensor = (torch.randn(shape, generator=gen) * 100).to(dtype)
    with ActivationStore(0, tmp_path) as store:
        kept = store.put(tensor)
        # Nothing to spill in an empty tensor: it fits any budget.
        assert isinstance(kept, torch.Tensor if tensor.numel() == 0 else SpilledTensor)
        back = materialize(kept)
        assert back.dtype == dtype and back.shape == tensor.shape
        assert torch.equal(back, tensor)


def test_the_budget_keeps_what_fits_and_spills_the_rest(tmp_path: Path) -> None:
    store = ActivationStore(1000, tmp_path)
    a = store.put(torch.zeros(100))  # 400 B
    b = store.put(torch.zeros(100, dtype=torch.bfloat16))  # 200 B
    c = store.put(torch.zeros(200))  # 800 B: past the budget
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    assert isinstance(c, SpilledTensor) and c.path.is_file()
    assert (store.resident_bytes, store.spilled_bytes) == (600, 800)
    path = c.path
    del a, c
    gc.collect()
    # Dropping a tensor frees its share of the budget, and a spilled one its file.
    assert (store.resident_bytes, store.spilled_bytes) == (200, 0) and not path.exists()
    assert isinstance(store.put(torch.zeros(200)), torch.Tensor)  # 800 B fit again
    assert store.stats()["peak_spilled_bytes"] == 800
    held = store.put(torch.zeros(1000))
    spill_dirs = list(tmp_path.iterdir())
    assert len(spill_dirs) == 1 and any(spill_dirs[0].iterdir())
    store.close()
    assert list(tmp_path.iterdir()) == []
    del held


def test_past_the_budget_without_an_offload_directory_is_an_error() -> None:
    store = ActivationStore(1 << 20)
    held = store.put(torch.zeros(1 << 18))  # exactly 1 MiB
    with pytest.raises(MemoryError, match="more than the 0.00 GiB activation budget.*offload"):
        store.put(torch.zeros(1))
    del held
    store.put(torch.zeros(1))  # room again once the held tensor is gone
    with pytest.raises(ValueError, match=">= 0 bytes"):
        ActivationStore(-1)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_run_that_spills_quantizes_exactly_like_one_that_does_not(
    tmp_path: Path, method: str
) -> None:
    model = tiny_model("llama")
    spilling = copy.deepcopy(model)
    options = {"method": method, "bits": 4, "group_size": 64}
    if method == "awq":
        options |= {"n_grid": 2, "search_samples": 2, "rounding": "gptq"}
    config = config_from_dict(options)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    calib = CalibConfig(n_samples=4, seq_len=32, batch_size=2)
    quantize_model(model, config, calib=calib, samples=samples, progress=False)
    store = ActivationStore(0, tmp_path)  # every batch spills
    report = quantize_model(
        spilling, config, calib=calib, samples=samples, progress=False, activations=store
    )
    assert report.details["activations"]["spilled_written_bytes"] > 0
    want, got = model.state_dict(), spilling.state_dict()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    store.close()
    assert list(tmp_path.iterdir()) == []
