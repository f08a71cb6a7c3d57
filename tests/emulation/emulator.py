"""Run the CUDA kernels' CPU emulation (scripts/build_emulation.py) from tests.

:class:`Emulator` writes a call's input tensors to files, sends the runner one command line per
call and reads the outputs back as tensors. A checker's report (ASan, UBSan, TSan or the
emulator's own) makes the runner exit non-zero; :meth:`Emulator.run` raises
:class:`EmulationFailure` with its stderr, which a test of a deliberately broken kernel matches.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "build_emulation", ROOT / "scripts" / "build_emulation.py"
)
build_emulation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_emulation)

# Kernel dtype codes shared by every family's DType enum.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=66",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}


class EmulationFailure(RuntimeError):
    """The runner stopped: a checker's report, a launch error or a crash (stderr attached)."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"emulation runner exited with {returncode}:\n{stderr[-6000:]}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass
class Call:
    """One launcher call: ``op`` with integer params, input tensors and output specs."""

    op: str
    params: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)


def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        arr = np.frombuffer(data, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(shape)


class Emulator:
    """A built runner of one flavor (``asan``, ``tsan`` or ``plain``)."""

    def __init__(self, runner: Path, flavor: str) -> None:
        self.runner = runner
        self.flavor = flavor

    @classmethod
    def build(cls, flavor: str, mutation: tuple[str, str, str] | None = None) -> Emulator:
        jobs = os.cpu_count() or 2
        return cls(build_emulation.build(flavor, jobs=jobs, mutation=mutation), flavor)

    def run(
        self, calls: list[Call], env: dict[str, str] | None = None, timeout: float = 900
    ) -> list[dict[str, torch.Tensor]]:
        """Run ``calls`` in one runner process; returns each call's outputs by name."""
        with tempfile.TemporaryDirectory(prefix="quantlab-emu-") as tmp:
            lines, outs = [], []
            for i, call in enumerate(calls):
                words = [call.op]
                words += [f"p.{k}={int(v)}" for k, v in call.params.items()]
                words += [f"off.{k}={int(v)}" for k, v in call.offsets.items()]
                for name, tensor in call.inputs.items():
                    path = Path(tmp) / f"{i}_{name}.in"
                    path.write_bytes(_to_bytes(tensor))
                    words.append(f"in.{name}={path}")
                for name, (dtype, shape) in call.outputs.items():
                    path = Path(tmp) / f"{i}_{name}.out"
                    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
                    words.append(f"out.{name}={path}:{nbytes}")
                    outs.append((i, name, path, dtype, shape))
                lines.append(" ".join(words))
            run_env = {**os.environ, **SANITIZER_ENV, **(env or {})}
            done = subprocess.run(
                [str(self.runner)],
                input="\n".join(lines) + "\n",
                capture_output=True,
                text=True,
                env=run_env,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise EmulationFailure(done.returncode, done.stderr)
            self.last_stdout = done.stdout
            results: list[dict[str, torch.Tensor]] = [{} for _ in calls]
            for i, name, path, dtype, shape in outs:
                results[i][name] = _from_bytes(path.read_bytes(), dtype, shape)
            return results


def assert_bits(y: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """``y`` equals ``want`` bit for bit (dtype, shape and every bit pattern)."""
    assert y.dtype == want.dtype and y.shape == want.shape, what
    bits = torch.int32 if y.dtype == torch.float32 else torch.int16
    bad = (y.view(bits) != want.view(bits)).nonzero().tolist()
    assert not bad, (
        f"{what}: {len(bad)} outputs differ, first at {bad[0]}: "
        f"{y[tuple(bad[0])].item()} != {want[tuple(bad[0])].item()}"
    )
