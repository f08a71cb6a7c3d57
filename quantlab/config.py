"""Frozen, self-validating, versioned method configurations, and the registry of methods."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from quantlab.solvers.base import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

__all__ = [
    "AWQConfig",
    "CalibConfig",
    "GPTQConfig",
    "GroupwiseIntConfig",
    "RTNConfig",
    "config_from_dict",
]

_SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from and how many.

    Attributes:
        source: a text source understood by :func:`quantlab.calib.data.load_text`.
        n_samples: number of token windows.
        seq_len: tokens per window.
        seed: seed of the window offsets.
        batch_size: windows per forward pass (``None`` = all at once, which is fastest).
    """

    source: str = "wiki-calib"
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupwiseIntConfig:
    """Options shared by every method that emits the groupwise integer format.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: 32, 64, 128, or -1 for one group per output channel.
        sym: symmetric grid (zero point 2^(bits-1)) instead of min/max with an integer zero point.
        scale_dtype: storage dtype of the scales.
        clip_search: shrink each group's range where that lowers its rounding error.
        modules_to_not_convert: module names (or shell patterns) left in full precision.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs_calibration: ClassVar[bool] = False

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    scale_dtype: str = "float16"
    clip_search: bool = False
    modules_to_not_convert: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), "
                f"got {self.group_size}"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}"
            )
        object.__setattr__(self, "modules_to_not_convert", tuple(self.modules_to_not_convert))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        """One line for summaries: method and encoding."""
        return f"{self.method} W{self.bits} g{self.group_size} {'sym' if self.sym else 'asym'}"


@dataclass(frozen=True)
class RTNConfig(GroupwiseIntConfig):
    """Round-to-nearest: each group rounded to its own min/max grid; no calibration."""

    method: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class GPTQConfig(GroupwiseIntConfig):
    """GPTQ: Hessian-aware column-by-column rounding with error feedback.

    Attributes:
        damp_percent: damping added to the Hessian diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        static_groups: with ``act_order``, fix each group's grid before the reordering so the
            checkpoint needs no ``g_idx`` permutation at inference.
        true_sequential: solve q/k/v, o, gate/up, down one after another within a block.
    """

    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True

    # GPTQ's reference quantizer offers this range search ("mse"); on SmolLM2 W4 g64 it takes the
    # eval ppl from 23.97 to 23.19, so it is on by default here.
    clip_search: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.act_order and not self.static_groups:
            raise ValueError(
                "act_order without static_groups needs a per-column g_idx at inference, which the "
                "groupwise_int format does not store; keep static_groups=True"
            )


_AWQ_SCALE_MODES = ("plain", "duo")
_AWQ_ROUNDINGS = ("rtn", "gptq")


@dataclass(frozen=True)
class AWQConfig(GroupwiseIntConfig):
    """AWQ: activation-aware input scales and clipping, folded into the float model, then rounding.

    Attributes:
        scale_modes: scale forms searched: ``"duo"`` (``x^a / w^(1-a)``, AutoAWQ's default) and/or
            ``"plain"`` (``x^a``, the paper's); both means twice the candidates.
        n_grid: grid points ``a = i / n_grid`` per form.
        coarse_to_fine: score every other grid point, then the best one's neighbours.
        search_samples: calibration sequences the scale candidates are scored on (statistics
            use every sequence); the search costs ``n_grid`` forward passes of each inspected
            module over these.
        apply_clip: search a clipping threshold per output row and group (q/k are skipped).
        max_shrink: the clip search tries thresholds down to ``1 - max_shrink`` of the maximum.
        rounding: ``"rtn"`` (AWQ proper) or ``"gptq"`` (AWQ's scales and clips, then GPTQ's
            Hessian-aware rounding, which also propagates quantization error between blocks).
        damp_percent, block_size, act_order, static_groups, true_sequential: GPTQ options, used
            when ``rounding="gptq"``.
    """

    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    # Defaults measured on SmolLM2 W4 g64 (docs/results.md): searching both forms gains ~0.3-0.4
    # ppl over duo alone; coarse-to-fine and 4 scored sequences halve and halve again the search
    # time at no measurable loss.
    scale_modes: tuple[str, ...] = ("plain", "duo")
    n_grid: int = 20
    coarse_to_fine: bool = True
    search_samples: int = 4
    apply_clip: bool = True
    max_shrink: float = 0.5
    rounding: str = "rtn"
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "scale_modes", tuple(self.scale_modes))
        if not self.scale_modes or set(self.scale_modes) - set(_AWQ_SCALE_MODES):
            raise ValueError(
                f"scale_modes must be a non-empty subset of {_AWQ_SCALE_MODES}, "
                f"got {self.scale_modes}"
            )
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be >= 1, got {self.n_grid}")
        if self.search_samples < 1:
            raise ValueError(f"search_samples must be >= 1, got {self.search_samples}")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in (0, 1), got {self.max_shrink}")
        if self.rounding not in _AWQ_ROUNDINGS:
            raise ValueError(f"rounding must be one of {_AWQ_ROUNDINGS}, got {self.rounding!r}")
        # The GPTQ options are validated by the GPTQConfig they become.
        if self.rounding == "gptq":
            self.gptq_config()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["scale_modes"] = list(self.scale_modes)
        return d

    def gptq_config(self) -> GPTQConfig:
        """The GPTQ configuration used for ``rounding="gptq"``."""
        return GPTQConfig(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            scale_dtype=self.scale_dtype,
            clip_search=self.clip_search,
            modules_to_not_convert=self.modules_to_not_convert,
            damp_percent=self.damp_percent,
            block_size=self.block_size,
            act_order=self.act_order,
            static_groups=self.static_groups,
            true_sequential=self.true_sequential,
        )


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a method config from its ``to_dict()`` output (any registered method)."""
    from quantlab.methods import methods

    data = dict(data)
    method = data.pop("method", None)
    version = data.pop("version", 1)
    table = methods()
    if method not in table:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(table)}")
    cls = table[method].config_cls
    if version != cls.version:
        raise ValueError(
            f"{method} config version {version} is not supported (expected {cls.version})"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {method} config fields: {sorted(unknown)}")
    # JSON has no tuples; every sequence field of a frozen config is a tuple.
    for f in dataclasses.fields(cls):
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)
