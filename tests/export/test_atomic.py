"""atomic_directory and its lock/journal: every failure path leaves the previous output intact and
no debris, a killed run is recovered by the next one, and a second writer is refused at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quantlab.export import atomic
from quantlab.export.atomic import (
    MARKER_NAME,
    OutputLockedError,
    OutputNotWritableError,
    OutputRecoveryWarning,
    atomic_directory,
    atomic_write_text,
    lock_path_for,
    output_lock,
)
from tests.lock_helpers import HOLD_CHILD, HOLDER_COMMAND, holding_lock, spawn

FILES = ("weights.bin", "config.json")

# Writes "new" into argv[1] and SIGKILLs itself at the step named by argv[2]: "writing" is inside
# the with-block, the others are the atomic._step points of the swap.
KILL_CHILD = """
import os, signal, sys
from pathlib import Path
from quantlab.export import atomic

target, point = Path(sys.argv[1]), sys.argv[2]

def die(at):
    if at == point:
        os.kill(os.getpid(), signal.SIGKILL)

atomic._step = die
with atomic.atomic_directory(target) as tmp:
    for name in ("weights.bin", "config.json"):
        (tmp / name).write_text("new")
    die("writing")
"""


def _write(directory: Path, text: str) -> None:
    for name in FILES:
        (directory / name).write_text(text)


def _previous(target: Path, text: str = "old") -> None:
    with atomic_directory(target) as tmp:
        _write(tmp, text)


def _assert_only(parent: Path, target: Path, text: str | None) -> None:
    """``parent`` holds exactly ``target``, whose files all say ``text`` (``None``: nothing)."""
    if text is None:
        assert os.listdir(parent) == []
        return
    assert os.listdir(parent) == [target.name]
    assert sorted(os.listdir(target)) == sorted(FILES)
    assert all((target / name).read_text() == text for name in FILES)


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _failing_replace(monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path, Path], bool]) -> None:
    """Make ``os.replace`` raise for the renames ``fails`` selects."""
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if fails(Path(src), Path(dst)):
            raise OSError(f"injected failure renaming {Path(src).name}")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("error", [RuntimeError("interrupted"), KeyboardInterrupt()])
def test_exception_in_body_keeps_previous_output(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out"
    _previous(target)
    with pytest.raises(type(error)), atomic_directory(target) as tmp:
        _write(tmp, "half written")
        raise error
    _assert_only(tmp_path, target, "old")


def test_first_rename_failure_keeps_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    _previous(target)
    _failing_replace(monkeypatch, lambda src, dst: src.name == "out")
    with (
        pytest.raises(OSError, match="injected failure renaming out"),
        atomic_directory(target) as tmp,
    ):
        _write(tmp, "new")
    _assert_only(tmp_path, target, "old")


def test_second_rename_failure_restores_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    _previous(target)
    _failing_replace(monkeypatch, lambda src, dst: ".quantlab-tmp-" in src.name)
    with (
        pytest.raises(OSError, match="injected failure renaming .out.quantlab-tmp-"),
        atomic_directory(target) as tmp,
    ):
        _write(tmp, "new")
    _assert_only(tmp_path, target, "old")


def test_failed_restore_reraises_the_original_error_and_the_next_run_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    _previous(target)
    _failing_replace(monkeypatch, lambda src, dst: dst.name == "out")  # the swap and the restore
    with (
        pytest.warns(OutputRecoveryWarning, match="could not restore"),
        pytest.raises(OSError, match="renaming .out.quantlab-tmp-"),
        atomic_directory(target) as tmp,
    ):
        _write(tmp, "new")
    monkeypatch.undo()
    # The new output is gone, the previous one waits in its backup, the journal says so.
    names = sorted(os.listdir(tmp_path))
    assert names[0] == ".out.quantlab-lock" and re.fullmatch(r"\.out\.quantlab-old-\w{8}", names[1])
    assert len(names) == 2
    journal = json.loads(lock_path_for(target).read_text())
    assert journal["phase"] == "swapping" and journal["backup"] == names[1]
    with (
        pytest.warns(OutputRecoveryWarning, match=f"restored the previous output {target}"),
        output_lock(target),
    ):
        pass
    _assert_only(tmp_path, target, "old")


# (kill point, a previous output exists, what the next run finds)
KILLS = [
    ("writing", True, "old"),
    ("writing", False, None),
    ("swapping", True, "old"),  # journaled "swapping", before the first rename
    ("swapping", False, "new"),  # nothing to move aside: the swap is finished
    ("moved-aside", True, "new"),  # between the two renames: the swap is finished
    ("swapped", True, "new"),  # after the second rename, the backup not yet deleted
    ("swapped", False, "new"),
]


@pytest.mark.parametrize(("point", "previous", "expected"), KILLS)
def test_killed_run_is_recovered_by_the_next_one(
    tmp_path: Path, point: str, previous: bool, expected: str | None
) -> None:
    target = tmp_path / "out"
    if previous:
        _previous(target)
    proc = spawn(KILL_CHILD, str(target), point)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    journal = json.loads(lock_path_for(target).read_text())
    assert journal["pid"] == proc.pid and journal["phase"] in ("writing", "swapping")

    leftovers = len(os.listdir(tmp_path)) - 1 - (os.path.lexists(target))
    recovery = (
        pytest.warns(OutputRecoveryWarning, match=f"pid {proc.pid}")
        if leftovers
        else _no_warnings()
    )
    with recovery, output_lock(target):
        pass
    _assert_only(tmp_path, target, expected)

    _previous(target, "third")  # a full new run after the recovery
    _assert_only(tmp_path, target, "third")


def test_kill_while_holding_the_lock_leaves_no_stale_lock(tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc = spawn(HOLD_CHILD, str(target), "kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert lock_path_for(target).exists()  # the file stays; the kernel dropped the flock
    with _no_warnings():
        _previous(target, "new")
    _assert_only(tmp_path, target, "new")


def test_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    _previous(target)
    with holding_lock(target) as proc:
        start = time.monotonic()
        with pytest.raises(OutputLockedError) as info, atomic_directory(target):
            pytest.fail("the body must not run")
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message
        assert f"command: {HOLDER_COMMAND}" in message
        assert str(lock_path_for(target)) in message
        assert sorted(os.listdir(tmp_path)) == [".out.quantlab-lock", "out"]
    _assert_only(tmp_path, target, "old")


def test_lock_is_reentrant_and_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "out"
    lock = lock_path_for(target)
    with output_lock(target, command="quantlab quantize --out out"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "quantlab quantize --out out" and holder["started"]
        assert holder["phase"] is None
        inode = lock.stat().st_ino
        with atomic_directory(target) as tmp:
            _write(tmp, "new")
        # The outer hold goes on: same file, same inode, back to phase null.
        assert lock.stat().st_ino == inode
        assert json.loads(lock.read_text())["phase"] is None
    assert not lock.exists()
    _assert_only(tmp_path, target, "new")


def test_nested_write_of_the_same_target_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        _write(tmp, "new")
        with (
            pytest.raises(OutputLockedError, match="already being written by this process"),
            atomic_directory(target),
        ):
            pass
    _assert_only(tmp_path, target, "new")


def test_journal_and_marker_during_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    _previous(target)
    lock = lock_path_for(target)
    seen: dict[str, dict[str, object]] = {}

    def step(point: str) -> None:
        seen[point] = json.loads(lock.read_text())

    monkeypatch.setattr(atomic, "_step", step)
    with atomic_directory(target) as tmp:
        journal = json.loads(lock.read_text())
        assert journal["phase"] == "writing" and journal["tmp"] == tmp.name
        assert json.loads((tmp / MARKER_NAME).read_text())["target"] == "out"
        _write(tmp, "new")
    swapping = seen["swapping"]
    assert swapping["phase"] == "swapping" and swapping["tmp"] == journal["tmp"]
    assert re.fullmatch(r"\.out\.quantlab-old-[0-9a-f]{8}", str(swapping["backup"]))
    assert list(seen) == ["swapping", "moved-aside", "swapped"]
    assert not (target / MARKER_NAME).exists()
    _assert_only(tmp_path, target, "new")


@pytest.mark.parametrize("target_exists", [True, False])
def test_orphans_of_older_versions_are_removed(tmp_path: Path, target_exists: bool) -> None:
    target = tmp_path / "out"
    if target_exists:
        _previous(target, "current")
    for name, text in ((".out.tmp-a1b2c3_4", "partial"), (".out.old-zz9_yy8x", "previous")):
        (tmp_path / name).mkdir()
        _write(tmp_path / name, text)
    # Not ours: wrong length, another target, a file, a new-style directory without the marker.
    keep = [".out.tmp-abc", ".other.tmp-abcdefgh", ".out.quantlab-tmp-0123abcd"]
    for name in keep:
        (tmp_path / name).mkdir()
    (tmp_path / ".out.tmp-abcdefgh").write_text("a file")
    keep.append(".out.tmp-abcdefgh")
    orphan = tmp_path / ".out.quantlab-tmp-89abcdef"
    orphan.mkdir()
    (orphan / MARKER_NAME).write_text(json.dumps({"target": "out", "pid": 1}))

    with pytest.warns(OutputRecoveryWarning) as record, output_lock(target):
        pass
    # Only the recovery warning: an unrelated one (a ResourceWarning a garbage collection of an
    # earlier test's object happens to emit inside the block) must not stand in for it.
    (message,) = [str(r.message) for r in record if r.category is OutputRecoveryWarning]
    assert str(orphan) in message and ".out.tmp-a1b2c3_4" in message
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "out"])
    # A missing target comes back from the old version's backup, the complete previous output.
    assert (target / "config.json").read_text() == ("current" if target_exists else "previous")


def test_acquirer_retries_when_the_lock_file_was_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    lock = lock_path_for(target)
    real_flock = atomic.fcntl.flock
    calls = []

    def flock(fd: int, operation: int) -> None:
        real_flock(fd, operation)
        calls.append(fd)
        if len(calls) == 1:
            # A releasing holder unlinked the file we opened and a newcomer created a fresh one.
            lock.unlink()
            lock.write_text("")

    monkeypatch.setattr(atomic.fcntl, "flock", flock)
    with output_lock(target) as path:
        held = atomic._HELD[lock_path_for(path)]
        assert os.fstat(held.fd).st_ino == lock.stat().st_ino
    assert len(calls) == 2
    assert not lock.exists()


def test_forked_child_does_not_inherit_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_lock(target):
        pid = os.fork()
        if pid == 0:  # the child: the parent's lock is not its own
            code = 2
            try:
                with output_lock(target):
                    code = 1
            except OutputLockedError as exc:
                code = 0 if f"pid {os.getppid()}" in str(exc) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_unwritable_location_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(OutputNotWritableError, match="cannot create the output's parent"),
        atomic_directory(tmp_path / "file" / "out"),
    ):
        pass
    assert os.listdir(tmp_path) == ["file"]


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["results.json"]
