"""Native BitNet b1.58 checkpoints in the HF layout: written here by transformers' own packing
code for a tiny random BitNet model (offline, no hub), loaded by quantlab, and compared with
transformers' own BitNet layers on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import quantlab
from quantlab.export.bitnet_checkpoint import load_bitnet, unpack_hf_bitnet
from quantlab.export.errors import CheckpointError
from quantlab.export.quantlab_checkpoint import save_quantized
from quantlab.nn.ternary_linear import TernaryLinear

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations import bitnet as hf_bitnet  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_transformers_bitnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' BitNet helpers are torch.compile'd; their eager originals keep this test fast
    and free of a C++ toolchain (and leave torch.compile alone for every other test)."""

    def eager(fn: object) -> object:
        return getattr(fn, "_torchdynamo_orig_callable", fn)

    monkeypatch.setattr(hf_bitnet, "unpack_weights", eager(hf_bitnet.unpack_weights))
    for cls, names in (
        (hf_bitnet.BitLinear, ("activation_quant", "post_quant_process")),
        (hf_bitnet.WeightQuant, ("forward",)),
        (hf_bitnet.ActQuant, ("forward",)),
    ):
        for name in names:
            raw = cls.__dict__[name]
            if isinstance(raw, staticmethod):
                monkeypatch.setattr(cls, name, staticmethod(eager(raw.__func__)))
            else:
                monkeypatch.setattr(cls, name, eager(raw))


def _bitnet_model() -> BitNetForCausalLM:
    torch.manual_seed(0)
    config = BitNetConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = BitNetForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def _write(
    model: BitNetForCausalLM,
    root: Path,
    linear_class: str = "autobitlinear",
    mode: str = "offline",
    extra: dict | None = None,
    shards: int = 1,
) -> Path:
    """The HF BitNet layout, written with transformers' pack_weights."""
    root.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name == "lm_head" or mode == "online":
            continue
        w = m.weight.detach().float()
        inv = 1.0 / w.abs().mean().clamp(min=1e-5)
        t = (w * inv).round().clamp(-1, 1)
        scale = (1.0 / inv) if linear_class == "autobitlinear" else inv
        state[f"{name}.weight"] = pack_weights(t.clone())
        # Released checkpoints keep the scale in the model dtype (bf16 for 2B-4T).
        state[f"{name}.weight_scale"] = scale.reshape(1).to(torch.bfloat16)
    config = model.config.to_dict()
    config["architectures"] = ["BitNetForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": mode,
        **(extra or {}),
    }
    (root / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(root / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = {k: state[k] for k in keys[i::shards]}
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(root / name))
            weight_map.update(dict.fromkeys(part, name))
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("linear_class", "mode"),
    [("autobitlinear", "offline"), ("bitlinear", "offline"), ("autobitlinear", "online")],
)
def test_loads_like_transformers_bitnet(linear_class: str, mode: str, tmp_path: Path) -> None:
    root = _write(_bitnet_model(), tmp_path / "bitnet", linear_class, mode)
    ours = quantlab.load(str(root))
    layers = [m for m in ours.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 2 * 7 and isinstance(ours.lm_head, nn.Linear)
    assert all(m.group_size == 0 and m.scales.dtype == torch.float32 for m in layers)
    theirs = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    a, b = _logits(ours, IDS), _logits(theirs, IDS)
    # Same int8 activations and trits; transformers sums the dequantized float products, we
    # the integers: fp32 rounding order only (measured at most 4.1e-7 of the largest logit).
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def test_round_trips_through_the_quantlab_format(tmp_path: Path) -> None:
    root = _write(_bitnet_model(), tmp_path / "bitnet", shards=3)
    model = load_bitnet(root, packing="tq1")
    assert isinstance(model.model.layers[1].mlp.down_proj, TernaryLinear)
    out = save_quantized(model, tmp_path / "quantlab", "bitnet", {"method": "bitnet"})
    again = quantlab.load(str(out))
    assert torch.equal(_logits(again, IDS), _logits(model, IDS))


@pytest.mark.parametrize("n", [8, 6, 1])
def test_unpacking_inverts_transformers_packing(n: int) -> None:
    t = torch.randint(-1, 2, (n, 10), generator=torch.Generator().manual_seed(n))
    packed = pack_weights(t.clone())
    assert torch.equal(unpack_hf_bitnet(packed, n), t.to(torch.int8))
    if n % 4 == 0:
        # (the eager original installed by the fixture; the name is looked up at call time)
        unpacked = hf_bitnet.unpack_weights(packed, torch.float32)
        assert torch.equal(unpacked.to(torch.int8), t.to(torch.int8))


def test_bad_checkpoints_are_reported(tmp_path: Path) -> None:
    model = _bitnet_model()
    root = _write(model, tmp_path / "rms", extra={"use_rms_norm": True})
    with pytest.raises(CheckpointError, match="use_rms_norm=True"):
        load_bitnet(root)
    root = _write(model, tmp_path / "cls", linear_class="fancy")
    with pytest.raises(CheckpointError, match="linear_class 'fancy'"):
        load_bitnet(root)

    root = _write(model, tmp_path / "shape")
    from safetensors.torch import load_file

    state = load_file(root / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight must be uint8 \[24, 64\]"):
        load_bitnet(root)

    state["model.layers.0.mlp.up_proj.weight"] = torch.full((24, 64), 0xFF, dtype=torch.uint8)
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(CheckpointError, match="invalid codes"):
        load_bitnet(root)

    del state["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight_scale must hold one value"):
        load_bitnet(root)

    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a BitNet checkpoint"):
        load_bitnet(root)


def test_info_describes_a_bitnet_checkpoint(tmp_path: Path) -> None:
    """``quantlab info`` finds the ternary linears the loader converts and the bits it stores."""
    from quantlab.export.info import checkpoint_info

    root = _write(_bitnet_model(), tmp_path / "bitnet")
    info = checkpoint_info(root, with_hash=False)
    assert info["layout"] == "bitnet" and "transformers" in info["engines"]
    assert info["quantized_linears"] == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert info["modules"] == {"ternary (BitNet b1.58, offline, autobitlinear)": 14}
    assert 2.0 < info["bits_per_weight"] < 2.1
