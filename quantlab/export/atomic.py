"""Atomic output directories, guarded by a lock file that doubles as a recovery journal.

A run that is interrupted at any instant (exception, Ctrl-C, SIGKILL) never leaves a half-written
output under the target's name, never loses the previous output, and leaves nothing behind that
the next run does not clean up. Journal, files and renames are also fsynced, so that after a power
loss the output is likewise the old one or the complete new one.

Lock
    Writing ``<parent>/<name>`` takes ``<parent>/.<name>.quantlab-lock``: opened with ``O_CREAT``
    and locked with ``flock(LOCK_EX | LOCK_NB)``, so a second writer (another process) fails at
    once with a message naming the holder. The kernel drops the lock when its holder dies, so a
    killed run leaves no stale lock: the next run locks the same file and reads its journal. A
    releasing holder unlinks the file while still holding the lock; an acquirer therefore checks,
    once locked, that the path still names the inode it locked, and starts over if not. Within one
    process the lock is re-entrant (a registry of held locks by resolved path, with a count): the
    CLI holds it from the start of ``quantize`` and :func:`atomic_directory` takes it again for the
    write (flock locks belong to an open file description, so a second ``open`` in the same
    process would conflict with the first). A forked child forgets the parent's locks and closes
    its copies of their descriptors, so a worker outliving a killed parent does not keep the lock.

Journal
    The lock file holds one JSON object, rewritten in place (``pwrite`` + ``ftruncate`` +
    ``fsync``; readers decode the first JSON value and ignore a torn tail)::

        {"pid": 4242, "host": "node1", "started": "2025-01-01T12:00:00+00:00",
         "command": "quantlab quantize ...", "target": "<name>",
         "phase": null | "writing" | "swapping",
         "tmp": ".<name>.quantlab-tmp-XXXXXXXX", "backup": ".<name>.quantlab-old-XXXXXXXX"}

    Phases of :func:`atomic_directory`, each journaled *before* the step it describes:

    * ``null``: lock held, nothing on disk (e.g. the CLI loading and quantizing the model).
    * ``"writing"``: the temporary directory ``tmp`` (beside the target, same filesystem) is created
      with a marker file ``.quantlab-partial`` (target name, pid, host) and filled. The target is
      untouched.
    * ``"swapping"``: ``tmp`` is complete (marker removed, files fsynced). Renames follow: the
      existing target to ``backup``, ``tmp`` to the target; then ``backup`` is deleted.

    Back at ``null`` (nothing left on disk to recover), the lock file is unlinked on release. When
    a cleanup failed, the file stays, journal and all, for the next run.

Recovery
    The first acquisition in a process reads the journal left by a holder that is gone:

    ========== ============================================= =====================================
    phase      state found                                   action
    ========== ============================================= =====================================
    writing    ``tmp`` exists                                remove ``tmp`` (target untouched)
    swapping   target exists                                 remove ``tmp`` and ``backup`` if there
                                                             (target is the old output before the
                                                             first rename, the new one after the
                                                             second)
    swapping   target missing, ``tmp`` exists                rename ``tmp`` to the target (finish
                                                             the swap), remove ``backup``
    swapping   target missing, only ``backup`` exists        rename ``backup`` to the target
    ========== ============================================= =====================================

    Then, still under the lock, orphans beside the target are removed: directories named
    ``.<name>.quantlab-tmp-XXXXXXXX`` whose marker names this target (a journal lost to a crash),
    and the ``.<name>.tmp-XXXXXXXX`` / ``.<name>.old-XXXXXXXX`` directories of quantlab versions
    before the journal (exact ``tempfile.mkdtemp`` name pattern). An old-version ``.old-``
    directory is the complete previous output (those versions deleted it only after the new output
    was in place), so when the target is missing it is restored instead. Every recovery is
    reported in one :class:`OutputRecoveryWarning` naming the paths.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER_NAME",
    "OutputLockedError",
    "OutputNotWritableError",
    "OutputRecoveryWarning",
    "atomic_directory",
    "atomic_write_text",
    "lock_path_for",
    "output_lock",
]

MARKER_NAME = ".quantlab-partial"
_LOCK_SUFFIX = ".quantlab-lock"
_TMP_INFIX = ".quantlab-tmp-"
_OLD_INFIX = ".quantlab-old-"
_JOURNAL_MAX = 1 << 16


class OutputLockedError(RuntimeError):
    """Another process (or an unfinished write of this one) is writing the same output."""


class OutputNotWritableError(OSError):
    """The output's parent directory cannot be created or written."""


class OutputRecoveryWarning(UserWarning):
    """Leftovers of an interrupted run were cleaned up, or its output was put in place."""


@dataclass
class _Held:
    """One lock held by this process: its open descriptor, re-entry count and journal."""

    fd: int
    lock_path: Path
    target: Path
    count: int
    journal: dict[str, Any]


_HELD: dict[Path, _Held] = {}
_GUARD = threading.Lock()


def _forget_after_fork() -> None:
    # A forked child shares the parent's open file descriptions, hence its flocks: closing the
    # child's copies keeps a long-lived worker from holding the lock after its parent died, and
    # the child must not believe it owns the parent's journal.
    global _GUARD
    _GUARD = threading.Lock()
    for held in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _step(point: str) -> None:
    """Test seam, called at each step of the swap ("swapping", "moved-aside", "swapped"); tests
    replace it to kill the process at that instant."""


def lock_path_for(target: str | os.PathLike[str]) -> Path:
    """``<parent>/.<name>.quantlab-lock``, the lock (and journal) file of output ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}{_LOCK_SUFFIX}"


def _normalized(target: str | os.PathLike[str]) -> Path:
    """``target`` with its parent created and resolved (one lock per directory entry, however
    the path is spelled); the last component is kept, since it is the entry that gets renamed."""
    path = Path(os.path.abspath(os.fspath(target)))
    if not path.name:
        raise ValueError(f"{path}: an output cannot be the filesystem root")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot create the output's parent directory {path.parent} ({exc.strerror}); "
            "choose another output location"
        ) from exc
    return path.parent.resolve() / path.name


def _read_journal(fd: int) -> dict[str, Any] | None:
    """The journal in the lock file, or ``None`` if it is empty or unreadable."""
    raw = os.pread(fd, _JOURNAL_MAX, 0)
    try:
        value, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _write_journal(held: _Held) -> None:
    data = json.dumps(held.journal).encode()
    # In place, not via rename: the file's inode is what the lock is taken on. Writing before
    # truncating leaves, at worst, the new object followed by a stale tail, which readers skip.
    os.pwrite(held.fd, data, 0)
    os.ftruncate(held.fd, len(data))
    os.fsync(held.fd)


def _describe_holder(target: Path, lock_path: Path, holder: dict[str, Any] | None) -> str:
    if holder is None:
        who = "another process (it has not recorded itself yet)"
    else:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}"
        )
    return (
        f"{target} is being written by {who}; wait for it to finish or choose another output "
        f"(lock file {lock_path})"
    )


def _lock_file(lock_path: Path, target: Path) -> int:
    """Open and lock ``lock_path``; raise :class:`OutputLockedError` naming the holder if taken."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputNotWritableError(
                f"the output location {target.parent} is not writable: cannot create "
                f"{lock_path} ({exc.strerror}); choose another output location"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_journal(fd)
            os.close(fd)
            raise OutputLockedError(_describe_holder(target, lock_path, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        # The previous holder unlinked the file between our open and our lock: this inode is
        # no longer the lock anyone else will see.
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a directory tree, file or link, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _journal_entry(parent: Path, journal: dict[str, Any], key: str, infix: str) -> Path | None:
    """The leftover named under ``key``, if it is a name this module creates: a damaged or
    hand-edited journal must not make recovery touch anything else."""
    name = journal.get(key)
    target = journal.get("target")
    if not isinstance(name, str) or not isinstance(target, str):
        return None
    if not re.fullmatch(rf"\.{re.escape(target)}{re.escape(infix)}[0-9a-f]{{8}}", name):
        return None
    return parent / name


def _recover_journal(target: Path, journal: dict[str, Any]) -> list[str]:
    """Undo or finish the swap a dead holder recorded (table in the module docstring)."""
    if journal.get("target") != target.name:
        return []
    parent = target.parent
    tmp = _journal_entry(parent, journal, "tmp", _TMP_INFIX)
    backup = _journal_entry(parent, journal, "backup", _OLD_INFIX)
    tmp_left = tmp is not None and os.path.lexists(tmp)
    backup_left = backup is not None and os.path.lexists(backup)
    who = f"pid {journal.get('pid')} on {journal.get('host')}"
    actions: list[str] = []
    phase = journal.get("phase")
    if phase == "writing" and tmp_left:
        _remove(tmp)
        actions.append(f"removed the partial output {tmp} of an interrupted run ({who})")
    elif phase == "swapping":
        if os.path.lexists(target):
            for leftover in (p for p, left in ((tmp, tmp_left), (backup, backup_left)) if left):
                _remove(leftover)
                actions.append(f"removed {leftover} left by an interrupted run ({who})")
        elif tmp_left:
            os.replace(tmp, target)
            actions.append(f"finished the interrupted swap ({who}): moved {tmp} to {target}")
            if backup_left:
                _remove(backup)
                actions.append(f"removed the previous output's copy {backup}")
        elif backup_left:
            os.replace(backup, target)
            actions.append(f"restored the previous output {target} from {backup} ({who})")
    return actions


def _marker_target(directory: Path) -> str | None:
    try:
        info = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info.get("target") if isinstance(info, dict) else None


def _remove_orphans(target: Path) -> list[str]:
    """Remove temporary directories of this target that no journal describes (see the module
    docstring); only exact name patterns are considered, and only directories."""
    name = re.escape(target.name)
    ours = re.compile(rf"\.{name}{re.escape(_TMP_INFIX)}[0-9a-f]{{8}}")
    # tempfile.mkdtemp's names: 8 characters of "abcdefghijklmnopqrstuvwxyz0123456789_".
    legacy = re.compile(rf"\.{name}\.(tmp|old)-[a-z0-9_]{{8}}")
    actions: list[str] = []
    with os.scandir(target.parent) as entries:
        candidates = sorted(
            Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.name[0] == "."
        )
    for path in candidates:
        if ours.fullmatch(path.name) and _marker_target(path) == target.name:
            _remove(path)
            actions.append(f"removed the orphaned partial output {path}")
        elif match := legacy.fullmatch(path.name):
            if match.group(1) == "old" and not os.path.lexists(target):
                os.replace(path, target)
                actions.append(f"restored {target} from {path} (left by an older quantlab)")
            else:
                _remove(path)
                actions.append(f"removed {path} (left by an older quantlab)")
    return actions


def _recover(target: Path, journal: dict[str, Any] | None) -> None:
    actions = _recover_journal(target, journal) if journal else []
    actions += _remove_orphans(target)
    if actions:
        warnings.warn(
            f"{target}: recovered after an interrupted run: " + "; ".join(actions),
            OutputRecoveryWarning,
            stacklevel=4,
        )


def _acquire(target: Path, command: str | None) -> _Held:
    lock_path = lock_path_for(target)
    with _GUARD:
        held = _HELD.get(lock_path)
        if held is not None:
            held.count += 1
            return held
        fd = _lock_file(lock_path, target)
        previous = _read_journal(fd)
        try:
            _recover(target, previous)
            held = _Held(
                fd,
                lock_path,
                target,
                1,
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                    "command": command if command is not None else shlex.join(sys.argv),
                    "target": target.name,
                    "phase": None,
                    "tmp": None,
                    "backup": None,
                },
            )
            _write_journal(held)
        except BaseException:
            # A previous journal stays for the next attempt; a file we just created goes.
            if previous is None:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            os.close(fd)
            raise
        _HELD[lock_path] = held
        return held


def _release(held: _Held) -> None:
    with _GUARD:
        held.count -= 1
        if held.count:
            return
        del _HELD[held.lock_path]
    try:
        if held.journal["phase"] is None:
            # Unlinked while still locked: an acquirer that opened it meanwhile sees the inode
            # change and retries on a fresh file.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(held.lock_path)
    finally:
        os.close(held.fd)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], command: str | None = None) -> Iterator[Path]:
    """Hold the lock of output ``target`` (re-entrant within a process); yield its normalized path.

    Creates the parent directories and the lock file, which proves the location writable
    (:class:`OutputNotWritableError` otherwise). Raises :class:`OutputLockedError` naming the
    holder when another process holds it. The first acquisition recovers what a killed writer left
    (see the module docstring). ``command`` is recorded for the error message of a second writer
    (default: this process's ``sys.argv``).
    """
    path = _normalized(target)
    held = _acquire(path, command)
    try:
        yield path
    finally:
        _release(held)


def _set_phase(held: _Held, **fields: Any) -> None:
    held.journal.update(fields)
    _write_journal(held)


def _settle(held: _Held, *leftovers: Path) -> None:
    """Back to phase ``null`` if none of ``leftovers`` is still on disk; otherwise keep the
    journal describing them, so that the next run removes them."""
    if any(os.path.lexists(p) for p in leftovers):
        return
    held.journal.update(phase=None, tmp=None, backup=None)
    # Best effort: the journal now only describes things that are gone, which recovery skips.
    with contextlib.suppress(OSError):
        _write_journal(held)


def _fresh_name(parent: Path, stem: str) -> Path:
    while True:
        path = parent / f"{stem}{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _fsync_tree(root: Path) -> None:
    """Flush every file, then the directories, so the renamed output is complete after a crash."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # Some filesystems refuse fsync on a directory; the renames are still atomic there.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _begin(held: _Held) -> Path:
    """Journal phase ``writing`` and create the temporary directory with its marker."""
    target = held.target
    with _GUARD:
        if held.journal["phase"] is not None:
            raise OutputLockedError(
                f"{target} is already being written by this process (nested or concurrent "
                "atomic_directory on the same output)"
            )
        tmp = _fresh_name(target.parent, f".{target.name}{_TMP_INFIX}")
        held.journal.update(phase="writing", tmp=tmp.name, backup=None)
    try:
        _write_journal(held)  # before the directory exists, so no instant leaves it unrecorded
        tmp.mkdir()
        (tmp / MARKER_NAME).write_text(
            json.dumps({"target": target.name, "pid": os.getpid(), "host": socket.gethostname()})
        )
    except BaseException:
        _remove(tmp)
        _settle(held, tmp)
        raise
    return tmp


def _swap(held: _Held, tmp: Path) -> None:
    """Put the complete ``tmp`` in place of the target; on failure restore the previous target."""
    target = held.target
    backup = _fresh_name(target.parent, f".{target.name}{_OLD_INFIX}")
    moved_aside = False
    try:
        _set_phase(held, phase="swapping", backup=backup.name)
        _step("swapping")
        if os.path.lexists(target):
            os.replace(target, backup)
            moved_aside = True
            _step("moved-aside")
        os.replace(tmp, target)
    except BaseException:
        if moved_aside:
            try:
                os.replace(backup, target)
            except OSError as restore_error:
                # The journal still says "swapping" with only the backup left: the next run
                # that takes this lock restores it. The original error is the one to report.
                warnings.warn(
                    f"could not restore {target} from {backup} ({restore_error}); the next "
                    f"quantlab run writing {target} restores it",
                    OutputRecoveryWarning,
                    stacklevel=4,
                )
        _remove(tmp)
        _settle(held, tmp, backup)
        raise
    _step("swapped")
    _fsync_dir(target.parent)
    _remove(backup)
    _settle(held, backup)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds.

    The temporary directory lives beside ``target`` (same filesystem, so the renames are atomic)
    and is journaled in the lock file of :func:`output_lock`, which is held for the whole write.
    An existing ``target`` is renamed aside and deleted only after the new one is in place. On any
    failure (an exception or ``KeyboardInterrupt`` in the block, a failed rename) the temporary
    directory is removed and the previous ``target`` is left as it was; after a kill, the next
    writer of ``target`` completes or undoes the swap. ``target`` is replaced whatever it holds:
    callers that must not replace foreign data check first
    (:func:`quantlab.export.output_guard.check_output_target`).
    """
    with output_lock(target) as path:
        held = _HELD[lock_path_for(path)]
        tmp = _begin(held)
        try:
            yield tmp
            (tmp / MARKER_NAME).unlink()
            _fsync_tree(tmp)
        except BaseException:
            _remove(tmp)
            _settle(held, tmp)
            raise
        _swap(held, tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
