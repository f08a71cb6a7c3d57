"""Write a synthetic checkpoint of a real architecture's shapes: random weights with realistic
per-channel scales, any number of decoder blocks, sharded safetensors in bf16 (or fp16/fp32),
with an index file, a config.json transformers builds the model from, and the bundled model's
tokenizer (its ids fit every preset's vocabulary; left out, and said, where the bundled model is
not installed). For measuring memory and time on 8B-70B
shapes without downloading a model; the numbers it produces are meaningless as a language model.

    python scripts/make_synthetic_checkpoint.py out/synth-8b --preset llama3-8b --blocks 4
    python scripts/make_synthetic_checkpoint.py out/synth-70b --preset llama3-70b --blocks 20

Weights: ``W = N(0, 1) * row_scale[:, None] * col_scale[None, :] / sqrt(in_features)``, with
log-normal row and column scales and a few input columns 10-30x larger (the activation-outlier
channels AWQ and GPTQ see in real models); norms ``1 + N(0, 0.05)``, embeddings ``N(0, 0.02)``.
One tensor is generated at a time and goes straight to its shard
(:class:`quantlab.export.checkpoint_files.ShardedWriter`; the directory appears atomically at the
end), so memory stays at about one tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quantlab.export.atomic import atomic_directory  # noqa: E402
from quantlab.export.checkpoint_files import ShardedWriter, parse_size  # noqa: E402
from quantlab.export.default_model import default_model_dir  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class Preset:
    """The config fields of a Llama-family model (Llama 3 8B / 70B, and a tiny one for tests), or
    of a Qwen3-MoE one (``experts`` > 0: q/k norms, ``experts`` routed experts of
    ``moe_intermediate_size`` per block, top ``experts_per_token``)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_theta: float = 500000.0
    head_dim: int | None = None
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0

    @property
    def head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def config(self, blocks: int, dtype: str) -> dict[str, object]:
        if self.experts:
            return {
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "moe_intermediate_size": self.moe_intermediate_size,
                "num_experts": self.experts,
                "num_experts_per_tok": self.experts_per_token,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head,
                "num_hidden_layers": blocks,
                "vocab_size": self.vocab_size,
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "rope_theta": self.rope_theta,
                "hidden_act": "silu",
                "attention_bias": False,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "dtype": dtype,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_hidden_layers": blocks,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": dtype,
        }


PRESETS = {
    "llama3-8b": Preset(4096, 14336, 32, 8, 128256),
    "llama3-70b": Preset(8192, 28672, 64, 8, 128256),
    # Qwen3-30B-A3B: 128 experts of 768, top 8, head_dim 128 (q_proj is 4096 wide).
    "qwen3-30b-a3b": Preset(
        2048,
        6144,
        32,
        4,
        151936,
        rope_theta=1e6,
        head_dim=128,
        experts=128,
        experts_per_token=8,
        moe_intermediate_size=768,
    ),  # fmt: skip
    "tiny-moe": Preset(
        256,
        512,
        4,
        2,
        49152,
        head_dim=64,
        experts=8,
        experts_per_token=2,
        moe_intermediate_size=128,
    ),  # fmt: skip
    # Tests: every shape rule of the big ones (GQA, untied head) at a few MB; "tiny-tied" ties.
    "tiny": Preset(256, 512, 4, 2, 49152),
    "tiny-tied": Preset(256, 512, 4, 2, 49152, tie_word_embeddings=True),
}


def block_shapes(preset: Preset, index: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of decoder block ``index`` (transformers' Llama names; a
    mixture's experts one tensor per expert projection, as its checkpoints store them)."""
    d, f = preset.hidden_size, preset.intermediate_size
    head = preset.head
    kv = preset.num_key_value_heads * head
    p = f"model.layers.{index}."
    if preset.experts:
        q = preset.num_attention_heads * head
        m = preset.moe_intermediate_size
        shapes = {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "self_attn.q_norm.weight": (head,),
            p + "self_attn.k_norm.weight": (head,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate.weight": (preset.experts, d),
        }
        for e in range(preset.experts):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (m, d)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (m, d)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (d, m)
        return shapes
    return {
        p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (d, d),
        p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d),
        p + "self_attn.o_proj.weight": (d, d),
        p + "post_attention_layernorm.weight": (d,),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
    }


def model_shapes(preset: Preset, blocks: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in file order (embedding, blocks, norm, head)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (preset.vocab_size, preset.hidden_size)
    }
    for index in range(blocks):
        shapes.update(block_shapes(preset, index))
    shapes["model.norm.weight"] = (preset.hidden_size,)
    if not preset.tie_word_embeddings:
        shapes["lm_head.weight"] = (preset.vocab_size, preset.hidden_size)
    return shapes


def synthetic_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """One tensor of the synthetic model (see the module docstring for the distributions)."""
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    if "embed_tokens" in name or name == "lm_head.weight":
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    out_f, in_f = shape
    rows = torch.exp(0.3 * torch.randn(out_f, generator=gen))
    cols = torch.exp(0.3 * torch.randn(in_f, generator=gen))
    outliers = torch.randperm(in_f, generator=gen)[: max(1, in_f // 512)]
    cols[outliers] *= 10.0 + 20.0 * torch.rand(len(outliers), generator=gen)
    weight = torch.empty(shape, dtype=dtype)
    # Row chunks of ~64 MB in fp32: a 28672 x 8192 weight is never whole in fp32.
    step = max(1, (1 << 24) // in_f)
    for start in range(0, out_f, step):
        stop = min(out_f, start + step)
        chunk = torch.randn(stop - start, in_f, generator=gen)
        chunk *= rows[start:stop, None] * cols[None, :] / math.sqrt(in_f)
        weight[start:stop] = chunk.to(dtype)
    return weight


def write_checkpoint(
    out: Path,
    preset_name: str,
    blocks: int,
    dtype_name: str = "bfloat16",
    max_shard_bytes: int = 2 * 10**9,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the checkpoint to ``out`` (replaced atomically); returns ``out``."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset_name!r}")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    preset, dtype = PRESETS[preset_name], DTYPES[dtype_name]
    shapes = model_shapes(preset, blocks)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with atomic_directory(out) as tmp:
        with ShardedWriter(tmp, max_shard_bytes) as writer:
            for i, (name, shape) in enumerate(shapes.items()):
                writer.add(name, synthetic_tensor(name, shape, gen, dtype))
                if progress and (i + 1) % 9 == 0:
                    print(
                        f"[synthetic] {i + 1}/{len(shapes)} tensors "
                        f"({time.perf_counter() - start:.0f} s)",
                        file=sys.stderr,
                    )
            writer.close()
        config = preset.config(blocks, dtype_name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        try:
            source = default_model_dir()
        except FileNotFoundError as exc:
            # A machine without the bundled model (a lent GPU) can still measure with random
            # calibration ids; said, since the checkpoint then has no tokenizer.
            print(f"[synthetic] no tokenizer copied: {exc}", file=sys.stderr)
        else:
            for name in TOKENIZER_FILES:  # (ids < 49152: valid for every preset's vocabulary)
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        provenance = {"synthetic": True, "preset": preset_name, "blocks": blocks, "seed": seed}
        (tmp / "synthetic.json").write_text(json.dumps(provenance, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--blocks", type=int, default=4, help="decoder blocks")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_checkpoint(
        args.out, args.preset, args.blocks, args.dtype, parse_size(args.max_shard_size), args.seed
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
