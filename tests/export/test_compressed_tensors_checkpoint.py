"""compressed-tensors' ``pack-quantized`` layout: written from quantlab's groupwise layers,
read back bit for bit, its config as the pinned release defines it, and what quantlab cannot hold
refused by name. (compressed-tensors' own library reads these checkpoints in
scripts/check_compressed_tensors_interop.py; docs/formats.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantlab
from quantlab.export.errors import CheckpointError
from quantlab.export.load import open_checkpoint_lazily
from quantlab.formats.compressed_tensors_layout import CT_VERSION
from quantlab.nn.groupwise_int_linear import QuantLinear
from tests.model_helpers import checkpoint_tensors


@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [(4, 32, False, "bfloat16"), (4, 64, True, "float16"), (3, -1, False, "float32"),
     (8, 128, True, "bfloat16"), (2, 32, False, "float16")],
)  # fmt: skip
def test_round_trip_is_bit_exact(
    tiny_llama: nn.Module, tmp_path: Path, bits: int, group: int, sym: bool, scale_dtype: str
) -> None:
    report = quantlab.quantize(
        tiny_llama, "rtn", bits=bits, group_size=group, sym=sym, scale_dtype=scale_dtype,
        progress=False,
    )  # fmt: skip
    out = quantlab.save(tiny_llama, str(tmp_path / "ct"), report, format="compressed-tensors")
    qc = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["version"] == CT_VERSION and qc["quantization_status"] == "compressed"
    (group_cfg,) = qc["config_groups"].values()
    weights = group_cfg["weights"]
    assert group_cfg["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert weights["num_bits"] == bits and weights["symmetric"] is sym
    assert weights["strategy"] == ("channel" if group == -1 else "group")
    assert weights["group_size"] == (None if group == -1 else group)
    stored = checkpoint_tensors(Path(out))
    name = "model.layers.0.mlp.down_proj"  # in 256 -> out 128
    layer = tiny_llama.get_submodule(name)
    assert torch.equal(stored[f"{name}.weight_packed"], layer.qweight)  # the same bitstream
    assert stored[f"{name}.weight_scale"].dtype == getattr(torch, scale_dtype)
    assert stored[f"{name}.weight_shape"].tolist() == [128, 256]
    assert (f"{name}.weight_zero_point" in stored) is not sym
    if not sym:
        assert stored[f"{name}.weight_zero_point"].shape == (
            (128 * bits + 31) // 32,
            layer.scales.shape[1],
        )
    loaded = quantlab.load(out)
    for key, module in tiny_llama.named_modules():
        if isinstance(module, QuantLinear):
            twin = loaded.get_submodule(key)
            assert isinstance(twin, QuantLinear) and twin.scales.dtype == module.scales.dtype
            assert torch.equal(twin.dequantized_weight(), module.dequantized_weight()), key
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_llama(x).logits)
    lazy = open_checkpoint_lazily(out)
    assert lazy is not None
    block = lazy.load("model.layers.0")
    assert torch.equal(block.mlp.down_proj.qweight, layer.qweight)


def _rewrite_config(out: Path, edit) -> None:  # noqa: ANN001
    path = out / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(format="int-quantized"), "format 'int-quantized'"),
        (lambda q: q.update(quantization_status="frozen"), "not packed"),
        (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
         "quantizes activations"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "g_idx"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=5), "5 bits"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=16), "group_size 16"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ],
)  # fmt: skip
def test_what_quantlab_cannot_hold_is_refused(
    tiny_llama: nn.Module,
    tmp_path: Path,
    edit,
    message: str,  # noqa: ANN001
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    out = Path(quantlab.save(tiny_llama, str(tmp_path / "ct"), report, format="compressed-tensors"))
    _rewrite_config(out, edit)
    with pytest.raises(CheckpointError, match=message):
        quantlab.load(str(out), verify=False)


def test_a_method_without_groupwise_layers_cannot_be_written(
    tiny_llama: nn.Module, tmp_path: Path
) -> None:
    report = quantlab.quantize(tiny_llama, "rtn", bits=4, group_size=32, progress=False)
    report.method = "bitstack"  # the check is by method, before anything is written
    with pytest.raises(ValueError, match="cannot be written as 'compressed-tensors'"):
        quantlab.save(tiny_llama, str(tmp_path / "ct"), report, format="compressed-tensors")


def test_streamed_sharded_export_is_the_in_memory_one(
    tiny_llama: nn.Module, tmp_path: Path
) -> None:
    """``quantlab quantize --format compressed-tensors`` streams block by block into shards; the
    tensors and the config are those of saving the model quantized in memory."""
    from quantlab.methods.base import CalibConfig
    from quantlab.methods.registry import get_method
    from quantlab.pipeline import quantize_checkpoint, quantize_model

    tiny_llama.save_pretrained(tmp_path / "src")
    config = get_method("gptq").config_cls(bits=4, group_size=32)
    samples = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibConfig(batch_size=2)
    report = quantize_model(tiny_llama, config, calib=calib, samples=samples, progress=False)
    resident = quantlab.save(
        tiny_llama, str(tmp_path / "resident"), report, format="compressed-tensors"
    )
    quantize_checkpoint(
        tmp_path / "src", tmp_path / "streamed", config, calib=calib, samples=samples,
        progress=False, baseline=False, export_format="compressed-tensors",
        max_shard_size="200KB",
    )  # fmt: skip
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    want, got = checkpoint_tensors(Path(resident)), checkpoint_tensors(tmp_path / "streamed")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    qc = [
        json.loads((d / "config.json").read_text())["quantization_config"]
        for d in (Path(resident), tmp_path / "streamed")
    ]
    assert qc[0]["config_groups"] == qc[1]["config_groups"] and qc[0]["ignore"] == qc[1]["ignore"]
