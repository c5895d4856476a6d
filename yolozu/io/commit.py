"""A run's output files written all together or not at all.

``write_outputs`` serialises every document (``write_files`` takes bytes already made), writes each to an anonymous
temporary file (Linux ``O_TMPFILE``, in the nearest existing folder above the output; a hidden named temporary file
where that is not available) and syncs it; only when every one is complete does it create missing folders, give
each file a hidden name beside its output and rename them into place. An error, Ctrl-C or even SIGKILL before that
commit leaves every output as it was, creates no folder and leaves no temporary file behind.

The commit itself is a few system calls per file: POSIX has no rename of several files at once. Each old
output is first given a hidden second name (a hard link), then the documents are renamed in the order given
(put the file readers look at first, the predictions, last); a rename that fails, or Ctrl-C (held back during
the renames), puts every replaced output back from its second name and removes the folders the commit created,
so the old outputs stay byte-identical. Only SIGKILL inside those microseconds can leave a mix; a hidden file it
leaves behind is removed by the next write of the same output. Paths are checked beforehand by ``yolozu.io.paths``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs

from yolozu.io.paths import PathLike, existing_folder
from yolozu.runtime import interrupts
from yolozu.runtime.faults import fault_point, kill_point


@attrs.define
class _Staged:
    """One document's bytes in an open temporary file: anonymous (``name`` None) or named."""

    target: Path
    fd: int
    name: str | None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


ANONYMOUS = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
"""Whether temporary files can be anonymous here (else a SIGKILL mid-write can leave a hidden named one)."""
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}


def _temp_prefix(target: Path) -> str:
    """The start of a temporary name for ``target``: hidden, with the writing process's id."""
    return f".{target.name[:64]}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the hidden temporary files of ``target`` that a process killed mid-commit left beside it (those
    whose process is gone); returns them.

    Args:
      target: the output file.
    Returns:
      The paths removed."""
    removed = []
    prefix = f".{target.name[:64]}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent if str(target.parent) else "."):
            pid = entry.name[len(prefix) :].split(".", 1)[0]
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _open_temp(folder: Path, target: Path) -> tuple[int, str | None]:
    if ANONYMOUS:
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666), None
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    return fd, name


def _discard(staged: _Staged) -> None:
    """Close and remove ``staged``'s temporary file (once; a committed file has no temporary name left)."""
    if staged.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(staged.fd)
        staged.fd = -1
    if staged.name is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.name)
        staged.name = None


def _stage(target: Path, data: bytes) -> _Staged:
    """``data`` written and synced to a temporary file on ``target``'s file system."""
    folder = existing_folder(target.parent)
    try:
        fd, name = _open_temp(folder, target)
    except OSError as e:
        raise PermissionError(f"cannot write {target}: folder {folder} is not writable ({e.strerror})") from e
    staged = _Staged(target, fd, name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        kill_point("output-written")
        os.fsync(fd)
        kill_point("output-synced")
    except BaseException as e:
        _discard(staged)
        if isinstance(e, OSError):
            raise type(e)(f"cannot write {target}: {e.strerror or e}") from e
        raise
    return staged


def _make_folders(folder: Path, create: bool, target: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors (top first); returns those created."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing and not create:
        raise FileNotFoundError(f"cannot write {target}: folder {missing[0]} does not exist (create it first)")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as e:
            raise type(e)(f"cannot create the folder {path} of {target}: {e.strerror or e}") from e
        created.append(path)
    return created


def _name_in_place(staged: _Staged) -> Path:
    """A hidden temporary name beside ``staged.target`` for its bytes."""
    folder = staged.target.parent
    if staged.name is not None:
        if Path(staged.name).parent == folder:
            return Path(staged.name)
        moved = folder / Path(staged.name).name
        os.rename(staged.name, moved)
        staged.name = str(moved)
        return moved
    temp = folder / f"{_temp_prefix(staged.target)}{secrets.token_hex(4)}.tmp"
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:  # passing a dir fd makes os.link call linkat with AT_SYMLINK_FOLLOW, which /proc/self/fd/N needs
        os.link(f"/proc/self/fd/{staged.fd}", temp.name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)
    staged.name = str(temp)
    return temp


def _named(staged: _Staged) -> Path:
    """``_name_in_place``, its failure naming the output rather than a hidden temporary file."""
    try:
        return _name_in_place(staged)
    except OSError as e:
        raise type(e)(f"cannot write {staged.target}: {e.strerror or e}; every output was left as it was") from None


@contextlib.contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) is held back during the block and noted in the list it yields, for the block to act on
    (the commit undoes its renames, then raises KeyboardInterrupt)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if caught and not callable(previous):  # SIGINT was ignored or defaulted: keep that behaviour
            caught.clear()


def _backup(target: Path) -> Path | None:
    """A hidden second name (a hard link; a copy where the file system has none) for the file ``target`` before
    it is replaced, so that a failed commit can put it back; None when there is no file to keep."""
    if not os.path.lexists(target):
        return None
    backup = target.parent / f"{_temp_prefix(target)}{secrets.token_hex(4)}.tmp"
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


def _undo(done: Sequence[tuple[Path, Path | None, bool]]) -> None:
    """Put every replaced output back as it was (newest first): its backup renamed over it, or the new file
    removed where there was none."""
    for target, backup, replaced in reversed(done):
        if backup is not None and replaced:
            os.replace(backup, target)
        elif backup is not None:  # still a second name of the untouched output (rename would do nothing)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(backup)
        elif replaced:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)


def _rename_all(staged: Sequence[_Staged], temps: Sequence[Path]) -> None:
    """Rename every temporary file onto its target, all or none: each old output is kept under a hidden name
    until every rename succeeded, and a failure or Ctrl-C on the way puts every one back before raising."""
    done: list[tuple[Path, Path | None, bool]] = []
    try:
        with _interrupts_held() as caught:
            try:
                for s, temp in zip(staged, temps):
                    done.append((s.target, _backup(s.target), False))
                    try:
                        fault_point("output-rename")
                        os.replace(temp, s.target)
                    except OSError as e:
                        raise type(e)(
                            f"cannot replace {s.target}: {e.strerror or e}; every output was left as it was"
                        ) from None
                    done[-1] = (s.target, done[-1][1], True)
                    s.name = None
                if caught:
                    raise KeyboardInterrupt
            except BaseException:
                _undo(done)
                done.clear()
                raise
    finally:
        for _, backup, _ in done:
            if backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(staged: Sequence[_Staged], create_folders: bool) -> None:
    """Create missing folders, give every temporary file a name beside its target, then rename them in order
    (``_rename_all``); a failure anywhere leaves the old outputs and removes the files and folders it made."""
    kill_point("output-commit")
    interrupts.check()  # a Ctrl-C some library swallowed still ends the run before any output is replaced
    created: list[Path] = []
    try:
        for s in staged:
            created += _make_folders(s.target.parent, create_folders, s.target)
        _rename_all(staged, [_named(s) for s in staged])
    except BaseException:
        for s in staged:
            _discard(s)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for s in staged:
        remove_stale_temps(s.target)
    for folder in {s.target.parent for s in staged}:
        _sync_folder(folder)


def serialise(obj: Any, indent: int | None = None) -> bytes:
    """``obj`` as the bytes of a JSON file (strict JSON: NaN and infinities are errors).

    Args:
      obj: a JSON-ready value.
      indent: the indent (None: one line).
    Returns:
      UTF-8 bytes.
    Raises:
      ValueError: a non-finite number.
      TypeError: a value JSON cannot hold."""
    return (json.dumps(obj, indent=indent, allow_nan=False) + "\n").encode("utf-8")


def write_outputs(documents: Sequence[tuple[PathLike, Any, int | None]], *, create_folders: bool = True) -> None:
    """Write every ``(path, obj, indent)`` as JSON, all or none (``write_files``).

    Args:
      documents: ``(path, obj, indent)`` triples; all are serialised before anything is written.
      create_folders: whether missing folders are created."""
    write_files([(path, serialise(obj, indent)) for path, obj, indent in documents], create_folders=create_folders)


def write_files(files: Sequence[tuple[PathLike, bytes]], *, create_folders: bool = True) -> None:
    """Write every ``(path, data)``, all or none (see the module doc); committed in the order given.
    ``create_folders=False`` makes a missing folder an error.

    Args:
      files: ``(path, bytes)`` pairs.
      create_folders: whether missing folders are created."""
    datas = [(Path(path), data) for path, data in files]
    if not create_folders:
        for target, _ in datas:
            _make_folders(target.parent, False, target)
    staged: list[_Staged] = []
    try:
        for target, data in datas:
            staged.append(_stage(target, data))
        _commit(staged, create_folders)
    finally:
        for s in staged:
            _discard(s)
