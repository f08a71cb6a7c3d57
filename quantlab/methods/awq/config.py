"""AWQ's options (:class:`AWQConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from quantlab.methods.base import GroupwiseIntConfig
from quantlab.methods.gptq import GPTQConfig

__all__ = ["AWQConfig"]

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
