"""What an output path may replace, and whether a checkpoint will fit there.

quantlab replaces only what it wrote itself: :func:`check_output_target` refuses a file, a
non-empty directory that is not a quantlab checkpoint, a symbolic link, the input model's directory
or one containing it, and an existing quantlab checkpoint unless ``overwrite`` is given.
:func:`check_free_space` refuses a target without room for the checkpoint
(:func:`quantlab.export.save.estimate_checkpoint_bytes` bounds its size) before hours of
quantization are spent. Run both under :func:`quantlab.export.atomic.output_lock`, so that nothing
changes the target between the check and the write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from quantlab.export.schema import QUANT_METHOD

__all__ = ["OutputTargetError", "check_free_space", "check_output_target", "is_quantlab_output"]


class OutputTargetError(ValueError):
    """The output path holds something quantlab must not replace, or too little space is free."""


def is_quantlab_output(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory quantlab wrote: its ``config.json`` parses and
    its ``quantization_config`` is quantlab's own layout, or quantlab's export of the GPTQ layout
    (``meta.quantlab_method``) or of the AWQ layout (a ``quantlab`` entry)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qcfg, dict):
        return False
    method = qcfg.get("quant_method")
    if method == QUANT_METHOD:
        return True
    if method == "gptq":
        meta = qcfg.get("meta")
        return isinstance(meta, dict) and "quantlab_method" in meta
    return method == "awq" and "quantlab" in qcfg


def check_output_target(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> None:
    """Raise :class:`OutputTargetError` unless writing a checkpoint to ``out`` replaces nothing
    but a quantlab checkpoint the caller agreed to replace (``overwrite``).

    ``inputs`` are directories the run reads (the model): ``out`` may be neither one of them nor
    a directory containing one, since replacing it would delete them.
    """
    path = Path(out)
    resolved = path.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if resolved == source_path:
            raise OutputTargetError(
                f"{out} is the input model directory; writing the checkpoint there would replace "
                "the model: choose another output directory"
            )
        if resolved in source_path.parents:
            raise OutputTargetError(
                f"{out} contains the input model directory {source}; replacing it would delete "
                "the model: choose another output directory"
            )
    if path.is_symlink():
        raise OutputTargetError(
            f"{out} is a symbolic link (to {resolved}); the link itself would be replaced: give "
            "the directory it points to, or another output directory"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputTargetError(
            f"{out} exists and is a file, not a checkpoint directory; remove it or choose "
            "another output directory"
        )
    if not any(path.iterdir()):
        return
    if not is_quantlab_output(path):
        raise OutputTargetError(
            f"{out} is a non-empty directory that is not a quantlab checkpoint; quantlab replaces "
            "only its own outputs: choose a new or empty directory"
        )
    if not overwrite:
        raise OutputTargetError(
            f"{out} already holds a quantlab checkpoint; pass --overwrite (overwrite=True) to "
            "replace it"
        )


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def check_free_space(out: str | os.PathLike[str], needed: int) -> None:
    """Raise :class:`OutputTargetError` when the filesystem of ``out``'s parent (which must
    exist) has fewer than ``needed`` bytes free. An existing checkpoint at ``out`` frees nothing
    in advance: it is deleted only once the new one is complete."""
    parent = Path(os.path.abspath(os.fspath(out))).parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OutputTargetError(
            f"not enough free space for {out}: the checkpoint needs up to {_fmt_bytes(needed)}, "
            f"{parent} has {_fmt_bytes(free)} free; free some space or choose another output "
            "directory"
        )
