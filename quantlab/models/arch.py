"""Architecture knowledge as data: where the decoder blocks are and which linears they hold.

Adding a family means adding one ``ArchSpec`` row below; nothing else in quantlab checks model
names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from quantlab.models.moe import ExpertNames, is_fused_experts, linearize_experts

__all__ = [
    "ARCHS",
    "ArchSpec",
    "SmoothMap",
    "UnsupportedArchitectureError",
    "excluded",
    "expand_smooth_maps",
    "get_submodule",
    "linearize",
    "resolve",
    "spec_for_type",
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
        also: float readers of the same input that are not quantized but must take the scales
            too for the block to compute the same function (a mixture's router, Qwen2-MoE's
            shared-expert gate): their weights' input columns are multiplied by ``s``.
        statistic: the module whose input gives the per-channel mean ``|x|`` the scales are
            searched from; ``""``: the linears' own input. A mixture's experts each see only their
            routed tokens, so its norm map reads the whole MoE layer's input (every token).

    Names may hold one ``*`` for an expert's index (:func:`expand_smooth_maps`): a map whose
    ``prev`` has it stands for one map per expert (each expert's up -> down); in ``linears`` (and
    ``also``) alone it stands for every expert's linear in one map (the norm in front of them all).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    prev_slices: int = 1
    also: tuple[str, ...] = ()
    statistic: str = ""


@dataclass(frozen=True)
class ArchSpec:
    """One decoder-only family.

    Attributes:
        family: short name.
        model_types: ``config.model_type`` values that use this layout.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        sequential_groups: linears inside a block, grouped by the input they read, in the order the
            forward pass reaches them (GPTQ's "true sequential" order). A name may hold one ``*``
            standing for an expert's index (``mlp.experts.*.gate_proj``): such a group stands for
            one group per expert. Names a block lacks are left out of that block (a family whose
            first blocks are dense and the rest mixtures of experts lists both).
        stages: the groups again, as the calibration passes see them: the groups of one stage
            read inputs that none of them produces (every expert's gate/up, and the shared
            expert's), so one pass gathers all their statistics. Default: one group per stage.
        embed: dotted path of the token embedding.
        final_norm: dotted path of the norm before the head.
        lm_head: dotted path of the output projection.
        smooth_maps: where input scales can be folded, in forward order (empty: not supported).
        norm_weight_offset: the family's norms multiply by ``weight + offset`` (Gemma: 1).
        clip_skip: linears AWQ's clip search leaves alone (q/k: their error passes through the
            q.k product, which a per-group output error does not measure).
        smooth_requires: ``(config attribute, value)`` pairs the smoothing maps assume (OPT's
            post-norm variants, ``do_layer_norm_before=False``, have no foldable norm).
        expert_names: what the family's checkpoints call one routed expert's projections
            (:func:`linearize` gives each expert linears of these names).
        stored_names: ``(attribute, name)`` pairs: a block submodule transformers keeps as
            ``attribute`` but checkpoints (and serving engines) call ``name`` (Mixtral's MoE layer
            is ``mlp`` in transformers, ``block_sparse_moe`` on disk and in vLLM).
            :func:`linearize` registers it under ``name`` (``block.attribute`` still reaches it,
            for the block's forward), so module paths, state-dict keys and checkpoint keys agree.
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
    expert_names: ExpertNames = field(default_factory=ExpertNames)
    stored_names: tuple[tuple[str, str], ...] = ()
    stages: tuple[tuple[tuple[str, ...], ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            object.__setattr__(self, "stages", tuple((group,) for group in self.sequential_groups))
        flat = tuple(group for stage in self.stages for group in stage)
        if flat != tuple(self.sequential_groups):
            raise ValueError(f"{self.family}: stages do not list sequential_groups in order")
        for group in flat:
            starred = ["*" in name for name in group]
            if any(starred) and not all(starred):
                raise ValueError(f"{self.family}: group {group} mixes expert and other linears")
            if any(name.count("*") > 1 for name in group):
                raise ValueError(f"{self.family}: group {group}: one '*' per name")

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Every name (or expert pattern) the groups list, in order."""
        return tuple(name for group in self.sequential_groups for name in group)

    def stages_of(self, block: nn.Module) -> list[list[tuple[str, ...]]]:
        """This block's stages: expert patterns expanded to one group per expert (in index
        order), names the block lacks left out, empty groups and stages dropped."""
        present = [name for name, _ in block.named_modules() if name]
        present_set = set(present)
        stages = []
        for stage in self.stages:
            groups: list[tuple[str, ...]] = []
            for group in stage:
                groups.extend(_expand_group(group, present, present_set))
            if groups:
                stages.append(groups)
        return stages

    def groups_of(self, block: nn.Module) -> list[tuple[str, ...]]:
        """This block's sequential groups in forward order (:meth:`stages_of`, flattened)."""
        return [group for stage in self.stages_of(block) for group in stage]

    def linears_of(self, block: nn.Module) -> list[str]:
        """The paths of this block's linears that the groups list, in forward order."""
        return [name for group in self.groups_of(block) for name in group]


def _expand_group(
    group: tuple[str, ...], present: list[str], present_set: set[str]
) -> list[tuple[str, ...]]:
    if "*" not in group[0]:
        members = tuple(name for name in group if name in present_set)
        return [members] if members else []
    expanded = []
    for index in _indices(group[0], present):  # the experts the block holds, in index order
        members = tuple(
            name.replace("*", str(index))
            for name in group
            if name.replace("*", str(index)) in present_set
        )
        if members:
            expanded.append(members)
    return expanded


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

# Mixtures of experts (transformers' fused experts, linearized first: quantlab.models.moe). One
# stage gathers every expert's gate/up statistics (and the shared expert's, and a dense block's
# MLP: names a block lacks are skipped), the next every down projection. The routers
# (``mlp.gate``, Qwen2-MoE's ``shared_expert_gate``) are not listed: they stay in float.
_ATTENTION_STAGES = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    (("self_attn.o_proj",),),
)
_MOE_MLP_STAGES = (
    (
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
        ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
        ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
    ),
    (
        ("mlp.down_proj",),
        ("mlp.experts.*.down_proj",),
        ("mlp.shared_expert.down_proj",),
        ("mlp.shared_experts.down_proj",),
    ),
)
_QWEN_MOE_STAGES = _ATTENTION_STAGES + _MOE_MLP_STAGES

# Mixtral's checkpoints call the MoE layer block_sparse_moe (transformers: mlp; see
# ArchSpec.stored_names) and an expert's projections w1 (gate), w3 (up), w2 (down).
_MIXTRAL_STAGES = _ATTENTION_STAGES + (
    (("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3"),),
    (("block_sparse_moe.experts.*.w2",),),
)

# DeepSeek-V3's multi-head latent attention: q (or its low-rank q_a) and the compressed kv read the
# block's input; q_b and kv_b read the two normed latents; o reads the heads. The first
# ``first_k_dense_replace`` blocks have a dense MLP, the rest routed and shared experts.
_DEEPSEEK_V3_STAGES = (
    (("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),),
    (("self_attn.q_b_proj",), ("self_attn.kv_b_proj",)),
    (("self_attn.o_proj",),),
) + _MOE_MLP_STAGES


def _moe_mlp_smooth(gate: str, up: str, down: str, layer: str = "mlp") -> tuple[SmoothMap, ...]:
    """The MLP maps of a mixture-of-experts family (and of its dense blocks, where a block has
    them): the norm in front of every expert's gate/up and the shared expert's, scored on the
    whole MoE ``layer`` (router included) with the router's columns folded too; each expert's
    up -> down alone; the shared or dense MLP's up -> down."""
    experts = f"{layer}.experts.*"
    shared = ("mlp.shared_expert", "mlp.shared_experts")
    return (
        SmoothMap("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        SmoothMap(
            "post_attention_layernorm",
            (f"{experts}.{gate}", f"{experts}.{up}")
            + tuple(f"{s}.{proj}" for s in shared for proj in ("gate_proj", "up_proj")),
            layer,
            also=(f"{layer}.gate", "mlp.shared_expert_gate"),
            statistic=layer,
        ),
        SmoothMap(f"{experts}.{up}", (f"{experts}.{down}",), f"{experts}.{down}"),
        SmoothMap("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ) + tuple(SmoothMap(f"{s}.up_proj", (f"{s}.down_proj",), f"{s}.down_proj") for s in shared)


_QWEN_MOE_SMOOTH = _LLAMA_SMOOTH[:2] + _moe_mlp_smooth("gate_proj", "up_proj", "down_proj")
_MIXTRAL_SMOOTH = _LLAMA_SMOOTH[:2] + _moe_mlp_smooth("w1", "w3", "w2", "block_sparse_moe")
# MLA: the block's norm feeds q (or q_a) and the compressed kv; each latent's norm feeds its b
# projection. o_proj reads the heads of kv_b's v part through attention: no fold.
_DEEPSEEK_V3_SMOOTH = (
    SmoothMap(
        "input_layernorm",
        ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        "self_attn",
    ),
    SmoothMap("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"),
    SmoothMap("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"),
) + _moe_mlp_smooth("gate_proj", "up_proj", "down_proj")


def _flat(stages: tuple[tuple[tuple[str, ...], ...], ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(group for stage in stages for group in stage)


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
    ArchSpec(
        family="qwen-moe",
        # Qwen2-MoE (a shared expert with its own sigmoid gate) and Qwen3-MoE (q/k norms, no
        # shared expert); ``mlp_only_layers`` blocks have a dense MLP.
        model_types=("qwen2_moe", "qwen3_moe"),
        blocks="model.layers",
        sequential_groups=_flat(_QWEN_MOE_STAGES),
        stages=_QWEN_MOE_STAGES,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_QWEN_MOE_SMOOTH,
        clip_skip=_QK,
    ),
    ArchSpec(
        family="mixtral",
        model_types=("mixtral",),
        blocks="model.layers",
        sequential_groups=_flat(_MIXTRAL_STAGES),
        stages=_MIXTRAL_STAGES,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_MIXTRAL_SMOOTH,
        clip_skip=_QK,
        expert_names=ExpertNames(gate="w1", up="w3", down="w2"),
        stored_names=(("mlp", "block_sparse_moe"),),
    ),
    ArchSpec(
        family="deepseek-v3",
        model_types=("deepseek_v3",),
        blocks="model.layers",
        sequential_groups=_flat(_DEEPSEEK_V3_STAGES),
        stages=_DEEPSEEK_V3_STAGES,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        smooth_maps=_DEEPSEEK_V3_SMOOTH,
        clip_skip=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj"),
    ),
)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"module path {path!r} not found in {type(root).__name__}"
        ) from exc


def spec_for_type(model_type: str | None) -> ArchSpec | None:
    """The row whose ``model_types`` hold ``model_type``, or ``None``."""
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    return None


def linearize(model: nn.Module) -> int:
    """Give ``model``'s fused routed experts one linear per projection and expert, named as its
    family's checkpoints name them (:func:`quantlab.models.moe.linearize_experts`), and its
    blocks' submodules the names checkpoints give them (:attr:`ArchSpec.stored_names`); the
    model computes the same function. Returns how many experts modules were replaced."""
    spec = spec_for_type(getattr(getattr(model, "config", None), "model_type", None))
    replaced = linearize_experts(model, spec.expert_names if spec is not None else None)
    if spec is not None and spec.stored_names:
        blocks = get_submodule(model, spec.blocks)
        for block in blocks:
            for attribute, name in spec.stored_names:
                module = block._modules.pop(attribute, None)
                if module is None:
                    continue  # renamed before
                block._modules[name] = module
                # The block's forward reads self.<attribute>: a plain attribute, which
                # state_dict and named_modules do not walk.
                object.__setattr__(block, attribute, module)
    return replaced


def resolve(model: nn.Module, float_linears: bool = True) -> ArchSpec:
    """Find the ``ArchSpec`` for a transformers causal LM, or say what to add. ``float_linears``:
    also require its block linears to be ``nn.Linear`` (a model about to be quantized; an
    already quantized one, evaluated block by block, passes False).

    Every block must hold at least one listed linear (names a block lacks are skipped: a row
    lists the dense and the mixture-of-experts MLP of a family, and alternatives such as
    DeepSeek's ``q_proj`` / ``q_a_proj``). Fused experts (3-D parameters no linear hook can see)
    must have been :func:`linearize`d."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = spec_for_type(model_type)
    if spec is None:
        known = sorted(t for row in ARCHS for t in row.model_types)
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model "
            f"types: {known}. To add it, append an ArchSpec to quantlab/models/arch.py naming its "
            "blocks path and the linears of a block in forward order. (quantlab.replace_linear "
            "works on any model without calibration.)"
        )
    blocks = get_submodule(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedArchitectureError(f"{spec.blocks} of {model_type} is not a ModuleList")
    for index, block in enumerate(blocks):
        for path, module in block.named_modules():
            if is_fused_experts(module):
                raise UnsupportedArchitectureError(
                    f"{spec.blocks}.{index}.{path} holds fused experts (3-D parameters a "
                    "calibration hook cannot see); call quantlab.models.arch.linearize(model) "
                    "first"
                )
        names = spec.linears_of(block)
        if not names:
            raise UnsupportedArchitectureError(
                f"{model_type}: {spec.blocks}.{index} holds none of the linears its ArchSpec "
                f"lists ({list(spec.block_linears)})"
            )
        for name in names if float_linears else ():
            if not isinstance(get_submodule(block, name), nn.Linear):
                raise UnsupportedArchitectureError(
                    f"{model_type}: {spec.blocks}.{index}.{name} is not an nn.Linear"
                )
    return spec


def expand_smooth_maps(block: nn.Module, maps: Sequence[SmoothMap]) -> list[SmoothMap]:
    """``maps`` as they apply to this block: expert patterns expanded (see :class:`SmoothMap`),
    names the block lacks left out, and a map whose ``prev`` or every linear is missing dropped
    (a dense block of a mixture-of-experts family, or the reverse)."""
    present = [name for name, _ in block.named_modules() if name]
    present_set = set(present)

    def names(pattern: str, index: int | None) -> list[str]:
        if "*" not in pattern:
            return [pattern] if pattern in present_set else []
        if index is not None:
            name = pattern.replace("*", str(index))
            return [name] if name in present_set else []
        return [n for i in _indices(pattern, present) for n in names(pattern, i)]

    out = []
    for smooth in maps:
        per_expert = "*" in smooth.prev
        for index in _indices(smooth.prev, present) if per_expert else [None]:
            prev = names(smooth.prev, index)
            linears = [n for pattern in smooth.linears for n in names(pattern, index)]
            if not prev or not linears:
                continue
            inspect = names(smooth.inspect, index)
            statistic = names(smooth.statistic, index) if smooth.statistic else [""]
            if not inspect or not statistic:
                continue
            out.append(
                SmoothMap(
                    prev[0],
                    tuple(linears),
                    inspect[0],
                    smooth.prev_slices,
                    tuple(n for pattern in smooth.also for n in names(pattern, index)),
                    statistic[0],
                )
            )
    return out


def _indices(pattern: str, present: list[str]) -> list[int]:
    """The expert indices for which ``pattern`` (one ``*``) names a module of the block."""
    head, _, tail = pattern.partition("*")
    regex = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
    return sorted({int(m.group(1)) for name in present if (m := regex.match(name))})


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
