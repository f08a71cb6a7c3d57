"""Tiny randomly initialised models of every architecture family quantlab describes.

Widths are multiples of 64 so every group size test uses divides them; ``gqa`` picks fewer
key/value heads than query heads (which turns the v -> o smoothing map off).
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt")

_COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def tiny_model(model_type: str, gqa: bool = False, seed: int = 0) -> nn.Module:
    """A 2-block causal LM of ``model_type`` with random weights, in eval mode (fp32)."""
    import transformers as tf

    torch.manual_seed(seed)
    kv = 2 if gqa else 4
    if model_type == "opt":
        config = tf.OPTConfig(
            vocab_size=256,
            hidden_size=128,
            ffn_dim=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=128,
        )
        model = tf.OPTForCausalLM(config)
    else:
        classes = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
            "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
            "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
            "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
            "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        }
        config_cls, model_cls = classes[model_type]
        extra = {"head_dim": 32} if model_type.startswith(("gemma", "qwen3")) else {}
        if model_type == "phi3":
            extra.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config = config_cls(**_COMMON, num_key_value_heads=kv, **extra)
        model = model_cls(config)
    model.eval()
    # Random norm weights, so folding into them is not a special case of weight 1 (or 0 for
    # Gemma's 1 + w).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and "weight" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_moe_model(model_type: str, seed: int = 0, experts: int = 8) -> nn.Module:
    """A 2-block mixture of experts of ``model_type`` (transformers' fused experts, top-2 of
    ``experts``), random weights, eval mode, fp32. Qwen3-MoE's and DeepSeek-V3's first block is
    dense (``mlp_only_layers`` / ``first_k_dense_replace``); Qwen2-MoE has a shared expert with its
    gate, DeepSeek-V3 a shared expert and low-rank (MLA) attention."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts_per_tok=2,
    )
    if model_type == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=experts)
        model = tf.MixtralForCausalLM(config)
    elif model_type == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **common, intermediate_size=256, moe_intermediate_size=64, num_experts=experts,
            shared_expert_intermediate_size=128,
        )  # fmt: skip
        model = tf.Qwen2MoeForCausalLM(config)
    elif model_type == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **common, intermediate_size=256, moe_intermediate_size=64, num_experts=experts,
            head_dim=32, mlp_only_layers=[0], norm_topk_prob=True,
        )  # fmt: skip
        model = tf.Qwen3MoeForCausalLM(config)
    elif model_type == "deepseek_v3":
        common["num_key_value_heads"] = 4
        config = tf.DeepseekV3Config(
            **common, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=experts,
            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
            v_head_dim=32,
        )  # fmt: skip
        model = tf.DeepseekV3ForCausalLM(config)
    else:
        raise ValueError(f"no tiny mixture of experts for {model_type!r}")
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and "weight" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model
