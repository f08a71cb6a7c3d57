"""quantize_checkpoint: a checkpoint directory quantized into a new one block by block, written as
it goes (quantlab/export/streaming.py). On the bundled model it writes exactly the tensors the
in-memory run saves and loads to identical logits; on a bf16 synthetic model the tensors no
method touches keep their stored dtype and bytes; an error mid-run leaves no output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import quantlab
from quantlab.export.checkpoint_files import INDEX_FILE
from scripts import make_synthetic_checkpoint as synthetic
from tests.model_helpers import checkpoint_tensors

pytestmark = pytest.mark.model


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(3))


def test_streamed_checkpoint_equals_the_in_memory_one(
    default_model_path: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    report = quantlab.quantize(model, "rtn", bits=4, group_size=64, progress=False)
    resident = quantlab.save(model, str(tmp_path / "resident"), report)
    streamed = tmp_path / "streamed"
    quantlab.quantize_checkpoint(
        str(default_model_path),
        str(streamed),
        "rtn",
        bits=4,
        group_size=64,
        max_shard_size="40MB",
        progress=False,
    )
    assert (streamed / INDEX_FILE).is_file()  # sharded
    want, got = checkpoint_tensors(resident), checkpoint_tensors(streamed)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    loaded = quantlab.load(str(streamed))
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)


def test_untouched_tensors_keep_their_stored_dtype(tmp_path: Path) -> None:
    source = synthetic.write_checkpoint(tmp_path / "src", "tiny", 2, "bfloat16", progress=False)
    out = tmp_path / "out"
    report = quantlab.quantize_checkpoint(str(source), str(out), "rtn", progress=False)
    assert len(report.layers) == 2 * 7
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        pass_through = {n: f.get_tensor(n) for n in f.keys() if "_proj" not in n}  # noqa: SIM118
    got = checkpoint_tensors(out)
    for name, tensor in pass_through.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
    assert got["model.layers.1.mlp.down_proj.qweight"].dtype == torch.int32
    # The same weights quantized in memory (loaded in fp32) give the same packed tensors.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    quantlab.quantize(model, "rtn", progress=False)
    for name, tensor in model.state_dict().items():
        if name.endswith((".qweight", ".scales", ".qzeros")):
            assert torch.equal(got[name], tensor), name
    loaded = quantlab.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits)


def test_a_failure_mid_run_leaves_the_previous_output(tmp_path: Path) -> None:
    source = synthetic.write_checkpoint(tmp_path / "src", "tiny", 2, "bfloat16", progress=False)
    out = tmp_path / "out"
    quantlab.quantize_checkpoint(str(source), str(out), "rtn", progress=False)
    before = checkpoint_tensors(out)
    # A NaN in the second block: the run fails there, after block 0 was written to the new shards.
    bad = synthetic.write_checkpoint(tmp_path / "bad", "tiny", 2, "bfloat16", progress=False)
    tensors = checkpoint_tensors(bad)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.*(NaN|Inf)"):
        quantlab.quantize_checkpoint(str(bad), str(out), "rtn", progress=False)
    after = checkpoint_tensors(out)
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert not [p.name for p in tmp_path.iterdir() if ".quantlab-tmp" in p.name]


def test_a_whole_model_configuration_is_held_in_memory_and_says_so(
    short_default_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BitStack's prefix distillation trains every layer at once: quantize_checkpoint loads the
    whole model for it (saying so, with the reason) and writes the same checkpoint as the
    in-memory run (the query projections of the first 6 blocks only, to keep it short)."""
    source = short_default_model_path
    options = dict(
        n_blocks=3,
        rank=2,
        distill_steps=1,
        distill_blocks=1,
        modules_to_not_convert=["lm_head", "*.k_proj", "*.v_proj", "*.o_proj", "*.mlp.*"],
    )
    from quantlab.config import CalibConfig
    from quantlab.methods.registry import config_from_dict
    from quantlab.pipeline import quantize_checkpoint, quantize_model

    calib = CalibConfig(n_samples=4, seq_len=64)
    samples = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(5))
    config = config_from_dict({"method": "bitstack", **options})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    report = quantize_model(model, config, calib=calib, samples=samples, progress=False)
    resident = quantlab.save(model, str(tmp_path / "resident"), report)
    streamed = quantize_checkpoint(
        source, tmp_path / "streamed", config, calib=calib, samples=samples
    )
    assert "prefix distillation" in streamed.details["whole_model"]
    assert "the whole model (0.2 GiB in float32) is held in memory" in capsys.readouterr().err
    want, got = checkpoint_tensors(resident), checkpoint_tensors(tmp_path / "streamed")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert streamed.details["bitstack"]["order"] == report.details["bitstack"]["order"]


def test_the_compute_dtype_defaults_to_the_checkpoints_own(
    tmp_path: Path, default_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dtype auto` (the default): a bf16 checkpoint computes in bf16, the fp32 bundled model
    in fp32; config.json says which, else the stored float tensors do."""
    import json

    from quantlab.cli import main
    from quantlab.export.model_source import checkpoint_dtype

    source = synthetic.write_checkpoint(tmp_path / "src", "tiny", 2, "bfloat16", progress=False)
    assert checkpoint_dtype(source) == torch.bfloat16
    assert checkpoint_dtype(default_model_path) == torch.float32
    config_path = source / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float64"  # not a compute dtype quantlab offers: the tensors decide
    config_path.write_text(json.dumps(config))
    assert checkpoint_dtype(source) == torch.bfloat16
    # fp16: kept on a GPU, computed in fp32 (exact) on the CPU.
    config["torch_dtype"] = "float16"
    config_path.write_text(json.dumps(config))
    assert checkpoint_dtype(source, "cuda") == torch.float16
    assert checkpoint_dtype(source, "cpu") == torch.float32
    config["torch_dtype"] = "float64"
    config_path.write_text(json.dumps(config))

    out = tmp_path / "out"
    args = ["quantize", "--model", str(source), "--method", "rtn", "--out", str(out)]
    assert main([*args, "--no-eval", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16"
    # The plan counted the block in bf16: 2 bytes per weight of the tiny preset's block.
    block = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256  # q, o; k, v (GQA); MLP; norms
    fp32_copies = 3 * 4 * 256 * 512  # the solver's fp32 copies of the largest weight
    assert result["memory_plan"]["block_weights"] == 2 * block + fp32_copies
