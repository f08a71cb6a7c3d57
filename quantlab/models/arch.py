"""Architecture knowledge as data: where the decoder blocks are and which linears they hold.

Adding a family means adding one ``ArchSpec`` row below; nothing else in quantlab checks model
names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHS",
    "ArchSpec",
    "SmoothMap",
    "UnsupportedArchitectureError",
    "get_submodule",
    "resolve",
]


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class SmoothMap:
    """Linears that all read the output of one op, so per-input-channel scales can be folded.

    Multiplying the linears' input columns by ``s`` and dividing ``prev``'s output by ``s`` leaves
    the block's function unchanged (AWQ and BitStack both rely on this).

    Attributes:
        prev: path, inside a block, of the op producing the linears' input (a norm or a linear).
        linears: paths of the linears that read it.
        inspect: the module whose output AWQ scores when searching the scales (the whole
            attention or MLP where that is exact and cheap, else the linear itself).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class ArchSpec:
    """One decoder-only family.

    Attributes:
        family: short name.
        model_types: ``config.model_type`` values that use this layout.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        sequential_groups: linears inside a block, grouped by the input they read, in the order the
            forward pass reaches them (GPTQ's "true sequential" order).
        embed: dotted path of the token embedding.
        final_norm: dotted path of the norm before the head.
        lm_head: dotted path of the output projection.
        smooth_maps: where input scales can be folded, in forward order (empty: not supported).
        norm_weight_offset: the family's norms multiply by ``weight + offset`` (Gemma: 1).
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    sequential_groups: tuple[tuple[str, ...], ...]
    embed: str
    final_norm: str
    lm_head: str
    smooth_maps: tuple[SmoothMap, ...] = ()
    norm_weight_offset: float = 0.0

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential_groups for name in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# v_proj -> o_proj folds only when their widths match (no grouped-query attention); see
# SmoothMap users, which skip a map whose shapes do not line up.
_LLAMA_SMOOTH = (
    SmoothMap(
        "input_layernorm",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn",
    ),
    SmoothMap("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    SmoothMap("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    SmoothMap("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",
        # Families that share Llama's module names and block structure.
        model_types=("llama", "mistral", "qwen2", "qwen3", "granite"),
        blocks="model.layers",
        sequential_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_LLAMA_SMOOTH,
    ),
    ArchSpec(
        # Same linear names; Gemma's norms scale by (1 + weight), and Gemma 2 normalises the
        # attention output, so its MLP input comes from pre_feedforward_layernorm. Smoothing maps
        # are not described yet: GPTQ/RTN work, scale-folding methods raise.
        family="gemma",
        model_types=("gemma", "gemma2"),
        blocks="model.layers",
        sequential_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        norm_weight_offset=1.0,
    ),
)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"module path {path!r} not found in {type(root).__name__}"
        ) from exc


def resolve(model: nn.Module) -> ArchSpec:
    """Find the ``ArchSpec`` for a transformers causal LM, or say what to add."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            blocks = get_submodule(model, spec.blocks)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                raise UnsupportedArchitectureError(
                    f"{spec.blocks} of {model_type} is not a ModuleList"
                )
            for name in spec.block_linears:
                if not isinstance(get_submodule(blocks[0], name), nn.Linear):
                    raise UnsupportedArchitectureError(
                        f"{model_type}: {spec.blocks}.0.{name} is not an nn.Linear"
                    )
            return spec
    known = sorted(t for spec in ARCHS for t in spec.model_types)
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        f"{known}. To add it, append an ArchSpec to quantlab/models/arch.py naming its blocks path "
        "and the linears of a block in forward order. (quantlab.replace_linear works on any model "
        "without calibration.)"
    )
