"""Another process that holds (or dies holding) the output lock of a path, for the tests of the
lock (tests/export/test_atomic.py) and of the CLI's refusal of a second writer."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLDER_COMMAND = "quantlab quantize --out held"

# Holds the lock of argv[1] until its stdin closes (argv[2] == "kill": dies holding it instead).
HOLD_CHILD = f"""
import os, signal, sys
from quantlab.export.atomic import output_lock

with output_lock(sys.argv[1], command={HOLDER_COMMAND!r}):
    print("locked", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code args`` in the repository, with pipes for stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def holding_lock(target: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of ``target`` for the duration of the block."""
    proc = spawn(HOLD_CHILD, str(target), "hold")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
