"""Source checkpoints released in block-scaled FP8 (DeepSeek-V3's layout): read as the bf16 model
they encode, quantized as that model, their multi-token-prediction layer dropped and said so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantlab.export.checkpoint_files import CheckpointFiles
from quantlab.export.errors import CheckpointError
from quantlab.export.fp8_source import Fp8BlockFiles, open_source_checkpoint
from quantlab.methods.base import CalibConfig
from quantlab.methods.registry import get_method
from quantlab.pipeline import quantize_checkpoint
from tests.families import tiny_moe_model
from tests.model_helpers import checkpoint_tensors

# Blocks that cut every tiny DeepSeek-V3 weight unevenly (128 = 6 x 20 + 8, 64 = 2 x 24 + 16).
BLOCK = (20, 24)
FP8_MAX = 448.0


def _fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """Which weights DeepSeek-V3's release stores in FP8: every linear of the blocks but the
    router (``mlp.gate``); embeddings, norms and the head stay bf16."""
    return (
        tensor.dim() == 2
        and name.startswith("model.layers.")
        and name.endswith("_proj.weight")
        or name.endswith("_mqa.weight")
    )


def _to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 codes, fp32 block scales, the bf16 weight they encode) of ``w`` in BLOCK blocks."""
    n, k = w.shape
    bn, bk = BLOCK
    rows, cols = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(rows * bn, cols * bk)
    padded[:n, :k] = w.float()
    blocks = padded.view(rows, bn, cols, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    codes = (blocks / scale[:, None, :, None]).view(rows * bn, cols * bk)[:n, :k]
    codes = codes.to(torch.float8_e4m3fn)
    per_elem = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return codes, scale, (codes.float() * per_elem).to(torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny DeepSeek-V3 twice: as an FP8 release (block scales, quantization_config,
    one multi-token-prediction layer after the last block) and as the bf16 model it encodes."""
    root = tmp_path_factory.mktemp("fp8")
    model = tiny_moe_model("deepseek_v3").to(torch.bfloat16)
    model.save_pretrained(root / "saved")
    stored = checkpoint_tensors(root / "saved")
    config = json.loads((root / "saved" / "config.json").read_text())
    fp8: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if _fp8_linear(name, tensor):
            codes, scale, encoded = _to_fp8(tensor)
            fp8[name] = codes
            fp8[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
            plain[name] = encoded
        else:
            fp8[name] = plain[name] = tensor.contiguous()
    layers = config["num_hidden_layers"]
    # DeepSeek-V3's MTP layer: model.layers.<num_hidden_layers>.{eh_proj, enorm, hnorm, ...}.
    fp8[f"model.layers.{layers}.eh_proj.weight"] = torch.randn(128, 256).to(torch.bfloat16)
    fp8[f"model.layers.{layers}.enorm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    paths = {"fp8": root / "fp8", "plain": root / "plain"}
    for kind, tensors in (("fp8", fp8), ("plain", plain)):
        paths[kind].mkdir()
        save_file(tensors, str(paths[kind] / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(config)
        if kind == "fp8":
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(BLOCK),
            }
            cfg["num_nextn_predict_layers"] = 1
        (paths[kind] / "config.json").write_text(json.dumps(cfg))
    return paths


def test_fp8_weights_read_as_the_bf16_they_encode(checkpoints: dict[str, Path]) -> None:
    files = open_source_checkpoint(checkpoints["fp8"])
    assert isinstance(files, Fp8BlockFiles) and len(files.scaled) > 20
    want = checkpoint_tensors(checkpoints["plain"])
    assert not any(name.endswith("weight_scale_inv") for name in files.tensors)
    for name, tensor in want.items():
        got = files.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert files.tensors[name].dtype == tensor.dtype
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    rows = [127, 0, 21, 40, 41]  # across blocks, out of order
    assert torch.equal(files.get_rows(name, rows), want[name][rows])
    assert torch.equal(files.get_leading(name, 30), want[name][:30])
    files.close()


def test_an_fp8_release_quantizes_as_the_model_it_encodes(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The streamed pipeline on the FP8 release writes the same checkpoint, bit for bit, as on the
    bf16 model it encodes; the MTP layer is dropped and the report says both."""
    config = get_method("rtn").config_cls(bits=4, group_size=32)
    samples = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reports = {}
    for kind in ("fp8", "plain"):
        reports[kind] = quantize_checkpoint(
            checkpoints[kind], tmp_path / kind, config, calib=CalibConfig(batch_size=2),
            samples=samples, progress=False, baseline=False,
        )  # fmt: skip
    got, want = checkpoint_tensors(tmp_path / "fp8"), checkpoint_tensors(tmp_path / "plain")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    source = reports["fp8"].details["source"]
    assert source["fp8_block_scaled"]["block"] == list(BLOCK)
    assert source["dropped"] == {"tensors": 2, "first": "model.layers.2.eh_proj.weight"}
    assert "source" not in reports["plain"].details
    written = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert written["quantization_config"]["quant_method"] != "fp8"


def test_load_model_reads_an_fp8_release_as_its_bf16_model(checkpoints: dict[str, Path]) -> None:
    """``quantlab.load``'s float path (``--prompt``, fairness, the Python API) dequantizes the same
    way, without transformers' FP8 loading (which needs a GPU)."""
    from transformers import AutoTokenizer

    from quantlab.export.default_model import default_model_dir
    from quantlab.export.model_source import load_model

    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(checkpoints["fp8"])
    loaded = load_model(str(checkpoints["fp8"]), dtype="bfloat16")
    assert not loaded.quantized
    want = checkpoint_tensors(checkpoints["plain"])
    state = loaded.model.state_dict()
    name = "model.layers.1.mlp.experts.5.gate_proj.weight"
    assert torch.equal(state[name], want[name])
    assert torch.equal(state["model.layers.0.self_attn.q_b_proj.weight"],
                       want["model.layers.0.self_attn.q_b_proj.weight"])  # fmt: skip


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], qc: object) -> Path:
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if qc is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_fp8_checkpoints_quantlab_cannot_read_are_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with CheckpointFiles(checkpoints["fp8"]) as files:
        tensors = {name: files.get(name) for name in files.tensors}
    qc = json.loads((checkpoints["fp8"] / "config.json").read_text())["quantization_config"]
    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    cases = [
        (tensors, None, "declares no FP8"),
        (tensors, {**qc, "weight_block_size": None}, "not per-tensor"),
        ({k: v for k, v in tensors.items() if k != scale}, qc, "without a .weight_scale_inv"),
        ({**tensors, scale: tensors[scale][:, :1].contiguous()}, qc, "needs float32"),
        ({**tensors, scale: tensors[scale].double()}, qc, "needs float32"),
    ]
    for i, (content, config, message) in enumerate(cases):
        path = _rewrite(checkpoints["fp8"], tmp_path / str(i), content, config)
        with pytest.raises(CheckpointError, match=message):
            open_source_checkpoint(path)


def test_info_describes_an_fp8_release(checkpoints: dict[str, Path]) -> None:
    from quantlab.export.info import checkpoint_info

    info = checkpoint_info(checkpoints["fp8"], with_hash=False)
    assert info["layout"] == "fp8" and info["quantized_linears"] == len(
        open_source_checkpoint(checkpoints["fp8"]).scaled
    )
    assert info["modules"] == {
        "fp8 (block scales 20 x 24; read as bf16)": info["quantized_linears"]
    }
    assert 8 < info["bits_per_weight"] < 8.1
