"""Architecture knowledge as data: where the decoder blocks are and which linears they hold.

Adding a family means adding one ``ArchSpec`` row below; nothing else in quantlab checks model
names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHS",
    "ArchSpec",
    "SmoothMap",
    "UnsupportedArchitectureError",
    "excluded",
    "get_submodule",
    "resolve",
    "smooth_maps_for",
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
            attention or MLP where that is exact and cheap, else the linear itself). Its input
            must be the linears' input.
        prev_slices: ``prev`` is a fused linear whose output is this many equal slices and the
            linears read only the last one (Phi-3's ``qkv_proj`` -> ``o_proj`` reads v, its
            ``gate_up_proj`` -> ``down_proj`` reads up); 1 means the whole output.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    prev_slices: int = 1


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
        clip_skip: linears AWQ's clip search leaves alone (q/k: their error passes through the
            q.k product, which a per-group output error does not measure).
        smooth_requires: ``(config attribute, value)`` pairs the smoothing maps assume (OPT's
            post-norm variants, ``do_layer_norm_before=False``, have no foldable norm).
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
    clip_skip: tuple[str, ...] = ()
    smooth_requires: tuple[tuple[str, object], ...] = ()

    @property
    def block_linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential_groups for name in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_QK = ("self_attn.q_proj", "self_attn.k_proj")

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

# Gemma 2/3 normalise the attention output (post_attention_layernorm sits on o_proj's output), so
# the MLP reads pre_feedforward_layernorm.
_GEMMA2_SMOOTH = (
    _LLAMA_SMOOTH[0],
    _LLAMA_SMOOTH[1],
    SmoothMap("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _LLAMA_SMOOTH[3],
)

_PHI3_GROUPS = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)

_PHI3_SMOOTH = (
    SmoothMap("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    # v is the last third of qkv_proj's output only without grouped-query attention.
    SmoothMap("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_slices=3),
    SmoothMap("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    # down_proj reads act(gate) * up, and up is the second half of gate_up_proj's output.
    SmoothMap("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_slices=2),
)

_OPT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("fc1",),
    ("fc2",),
)

_OPT_SMOOTH = (
    SmoothMap(
        "self_attn_layer_norm",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn",
    ),
    SmoothMap("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    SmoothMap("final_layer_norm", ("fc1",), "fc1"),
    # ReLU(x / s) = ReLU(x) / s for s > 0, so fc1's rows can carry fc2's scales.
    SmoothMap("fc1", ("fc2",), "fc2"),
)

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",
        # Families that share Llama's module names and block structure (Qwen3's q/k norms act
        # after the projections, so they do not affect folding).
        model_types=("llama", "mistral", "qwen2", "qwen3", "granite"),
        blocks="model.layers",
        sequential_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_LLAMA_SMOOTH,
        clip_skip=_QK,
    ),
    ArchSpec(
        family="gemma",
        # Llama's layout; Gemma's norms scale by (1 + weight).
        model_types=("gemma",),
        blocks="model.layers",
        sequential_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_LLAMA_SMOOTH,
        norm_weight_offset=1.0,
        clip_skip=_QK,
    ),
    ArchSpec(
        family="gemma2",
        model_types=("gemma2", "gemma3_text"),
        blocks="model.layers",
        sequential_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_GEMMA2_SMOOTH,
        norm_weight_offset=1.0,
        clip_skip=_QK,
    ),
    ArchSpec(
        family="phi3",
        model_types=("phi3",),
        blocks="model.layers",
        sequential_groups=_PHI3_GROUPS,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_PHI3_SMOOTH,
        clip_skip=("self_attn.qkv_proj",),
    ),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        sequential_groups=_OPT_GROUPS,
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        smooth_maps=_OPT_SMOOTH,
        clip_skip=_QK,
        smooth_requires=(("do_layer_norm_before", True),),
    ),
)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"module path {path!r} not found in {type(root).__name__}"
        ) from exc


def resolve(model: nn.Module, float_linears: bool = True) -> ArchSpec:
    """Find the ``ArchSpec`` for a transformers causal LM, or say what to add. ``float_linears``:
    also require its block linears to be ``nn.Linear`` (a model about to be quantized; an
    already quantized one, evaluated block by block, passes False)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            blocks = get_submodule(model, spec.blocks)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                raise UnsupportedArchitectureError(
                    f"{spec.blocks} of {model_type} is not a ModuleList"
                )
            for name in spec.block_linears if float_linears else ():
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


def smooth_maps_for(model: nn.Module, spec: ArchSpec) -> tuple[SmoothMap, ...]:
    """The smoothing maps of ``spec`` for this model, or a clear error when it has none."""
    if not spec.smooth_maps:
        raise UnsupportedArchitectureError(
            f"{spec.family}: no smoothing maps are described, so scale-folding methods (AWQ, "
            "BitStack) cannot run; add SmoothMap rows (which op feeds which linears) to its "
            "ArchSpec in quantlab/models/arch.py"
        )
    config = getattr(model, "config", None)
    for attr, wanted in spec.smooth_requires:
        value = getattr(config, attr, None)
        if value != wanted:
            raise UnsupportedArchitectureError(
                f"{spec.family} with {attr}={value!r}: its smoothing maps assume {attr}={wanted!r} "
                "(a norm in front of each linear group), so scales cannot be folded"
            )
    return spec.smooth_maps


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether module path ``name`` matches one of ``modules_to_not_convert``'s patterns."""
    return any(fnmatch.fnmatch(name, p) or name == p or name.endswith("." + p) for p in patterns)
