"""Content hashes of a checkpoint's files, recorded when quantlab writes it and checked when it is
loaded, so a file changed, truncated or swapped after the write is refused instead of loaded.

``quantlab_checksums.json`` (written last, inside the same atomic directory as the rest)::

    {"format": "quantlab-checksums", "version": 1, "algorithm": "sha256",
     "files": {"model.safetensors": {"sha256": "<hex>", "bytes": 166717136},
               "config.json": {...}, "tokenizer.json": {...}, ...},
     "config": {<the config.json written, as a JSON object>}}

Every file quantlab wrote is listed (not hidden files, not the manifest itself). The copy of the
config lets a mismatch name the fields that changed. Checkpoints without the manifest (older
quantlab versions, other tools, or a transformers re-save) load with the structural checks only.
A file added to the directory later (a README) is not checked; a listed one that is missing is an
error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantlab.export.errors import CheckpointError
from quantlab.export.safetensors_file import file_sha256

__all__ = [
    "CHECKSUMS_NAME",
    "config_differences",
    "read_checksums",
    "verify_checksums",
    "write_checksums",
]

CHECKSUMS_NAME = "quantlab_checksums.json"
_FORMAT = "quantlab-checksums"
_VERSION = 1


def write_checksums(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Hash every file of ``directory`` (a checkpoint being written) into its manifest."""
    root = Path(directory)
    files = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.name == CHECKSUMS_NAME or not path.is_file():
            continue
        files[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        "algorithm": "sha256",
        "files": files,
    }
    config = root / "config.json"
    if config.is_file():
        manifest["config"] = json.loads(config.read_text())
    (root / CHECKSUMS_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_checksums(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checked manifest of ``directory``, or ``None`` when it has none."""
    path = Path(directory) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a quantlab checksum manifest")
    if manifest.get("version") != _VERSION or manifest.get("algorithm") != "sha256":
        raise CheckpointError(
            f"{path}: manifest version {manifest.get('version')!r} / algorithm "
            f"{manifest.get('algorithm')!r}; this quantlab reads version {_VERSION}, sha256"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and type(v.get("bytes")) is int
        for v in files.values()
    ):
        raise CheckpointError(f"{path}: 'files' must map names to {{sha256, bytes}}")
    return manifest


def config_differences(written: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (``a.b: 1 -> 2``), depth first."""
    if isinstance(written, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(written) | set(now), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                out.append(f"{path} removed")
            elif key not in written:
                out.append(f"{path} added")
            else:
                out.extend(config_differences(written[key], now[key], path))
        return out
    if written != now or type(written) is not type(now):
        return [f"{prefix or '<root>'}: {json.dumps(written)[:60]} -> {json.dumps(now)[:60]}"]
    return []


def verify_checksums(
    directory: str | os.PathLike[str], names: list[str] | None = None
) -> dict[str, Any] | None:
    """Check the files of ``directory`` against its manifest (``names``: only those; default:
    every listed file). Returns the manifest, ``None`` when there is none.

    Raises:
        CheckpointError: a listed file is missing, or its size or hash differs (for config.json
            the message names the changed fields).
    """
    root = Path(directory)
    manifest = read_checksums(root)
    if manifest is None:
        return None
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in names if names is not None else sorted(files):
        if name not in files:
            raise CheckpointError(
                f"{root / CHECKSUMS_NAME}: lists no checksum for {name}; the checkpoint was "
                "changed after quantlab wrote it"
            )
        path = root / name
        record = files[name]
        if not path.is_file():
            raise CheckpointError(f"{root}: {name} is missing (the checksum manifest lists it)")
        size = path.stat().st_size
        if size == record["bytes"] and file_sha256(path) == record["sha256"]:
            continue
        detail = f"{size} bytes, written {record['bytes']}" if size != record["bytes"] else "hash"
        if name == "config.json" and isinstance(manifest.get("config"), dict):
            try:
                changed = config_differences(manifest["config"], json.loads(path.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                changed = ["the file is no longer valid JSON"]
            if changed:
                detail = "changed fields: " + "; ".join(changed[:5])
                if len(changed) > 5:
                    detail += f"; and {len(changed) - 5} more"
        raise CheckpointError(
            f"{path} differs from what quantlab wrote ({detail}). The file was modified, "
            f"truncated or replaced after the export: restore it or re-export the checkpoint "
            f"(or load with verify=False / --no-verify to skip the checksum check at your risk)"
        )
    return manifest
