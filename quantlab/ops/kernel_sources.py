"""Which csrc/ files make up a kernel family's CUDA library, and their content digest.

Torch-free on purpose: ``setup.py`` loads this file by path (before quantlab is importable) to
write the digest of what it compiled into ``quantlab/_kernel_build.json``, and
:mod:`quantlab.ops.kernel_policy` compares that digest with the one a GPU run recorded in
``quantlab/ops/verified_kernels.json``. A kernel edited after its verification therefore has a
new digest and is unverified again, without anyone having to remember to say so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = [
    "BUILD_RECORD",
    "cuda_source_files",
    "cuda_sources_sha256",
    "read_build_record",
    "write_build_record",
]

# Written by setup.py next to the compiled libraries (an untracked build output, like the .so).
BUILD_RECORD = Path(__file__).resolve().parent.parent / "_kernel_build.json"


def cuda_source_files(csrc: Path, family: str) -> list[Path]:
    """Every file the family's CUDA library is compiled from or includes: its own directory, its
    CUDA binding and its checks header, and the shared headers of ``csrc/common``."""
    files = [p for p in (csrc / family).iterdir() if p.is_file()]
    files += [p for p in (csrc / "common").iterdir() if p.is_file()]
    files += [p for p in (csrc / "bindings").glob(f"{family}_*") if p.is_file()]
    return sorted(files)


def cuda_sources_sha256(csrc: Path, family: str) -> str:
    """sha256 over the files of :func:`cuda_source_files`, each prefixed by its path relative to
    ``csrc`` so that a rename changes the digest too."""
    digest = hashlib.sha256()
    for path in cuda_source_files(csrc, family):
        digest.update(str(path.relative_to(csrc)).encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def write_build_record(csrc: Path, families: dict[str, bool], target: Path = BUILD_RECORD) -> None:
    """Record, per built family, whether it has CUDA kernels and the digest of their sources
    (atomically: a half-written record would read as corrupt)."""
    record = {
        family: {"cuda": cuda, "cuda_sources_sha256": cuda_sources_sha256(csrc, family)}
        for family, cuda in sorted(families.items())
    }
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, target)


def read_build_record(path: Path = BUILD_RECORD) -> dict[str, dict[str, object]]:
    """The build record, or ``{}`` when the libraries were built without one (older build,
    another build system)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path} is unreadable ({exc}); rebuild the kernels") from exc
    if not isinstance(record, dict):
        raise RuntimeError(f"{path} is not a JSON object; rebuild the kernels")
    return record
