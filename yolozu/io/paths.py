"""Output paths checked before a run does any work: nothing it writes may lose data.

A run (``yolozu export``, ``yolozu eval``) writes several files: predictions, logs, a report. ``check_outputs``
refuses every path that would lose data: two outputs on one file (hard links included), an output that is one
of the run's inputs, an output that is not a regular file (a device, a FIFO, a socket, a folder), a symbolic link
that points nowhere, or a folder that cannot be created or written. A symbolic link to a regular file is
followed: the file it points to is replaced and the link kept, as the shell's ``>`` does (``OutputPath.link``
says so; ``link_notes`` words it for the user).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import attrs

PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output path that would lose data or cannot be written; the message names the flag and the path."""


@attrs.frozen
class OutputPath:
    """A checked output: the ``flag`` that named it, the ``path`` as given and the ``target`` file that will be
    replaced (the file ``path`` links to when ``link``)."""

    flag: str
    path: Path
    target: Path
    link: bool = False


_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def existing_folder(folder: Path) -> Path:
    """``folder`` or its nearest ancestor that exists (what a missing folder would be created in).

    Args:
      folder: a folder that may not exist.
    Returns:
      The nearest existing folder."""
    folder = Path(os.path.abspath(folder))
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _name_limit(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_length(flag: str, path: Path) -> None:
    """A name the file system cannot hold (a component over its NAME_MAX, a path over PATH_MAX) is a usage error
    before any work, instead of a raw errno at the end."""
    limit = _name_limit(existing_folder(Path(os.path.abspath(path)).parent))
    long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise OutputPathError(
            f"{flag}: the name {long[:40]}... is {len(os.fsencode(long))} bytes, over this file system's limit of "
            f"{limit}; give a shorter name"
        )
    if len(os.fsencode(os.path.abspath(path))) >= 4096:
        raise OutputPathError(f"{flag}: the path is over 4096 bytes long; give a shorter path")


def check_output(flag: str, path: PathLike) -> OutputPath:
    """``path`` checked as the output ``flag`` names; raise OutputPathError for a path that cannot or must not
    be replaced by a regular file.

    Args:
      flag: the flag that named the output.
      path: the output path.
    Returns:
      The checked ``OutputPath``.
    Raises:
      OutputPathError: naming the flag and the path."""
    if not os.fspath(path):
        raise OutputPathError(f"{flag} is empty; give the path of a file to write")
    path = Path(path)
    _check_length(flag, path)
    target, link = path, path.is_symlink()
    if link:
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputPathError(
                    f"{flag} {path} is a symbolic link that loops back on itself ({os.readlink(path)}); give the "
                    "path of the file to write, or remove the link"
                ) from None
        if not path.exists():
            raise OutputPathError(
                f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; give the path of "
                "the file to write, or remove the link"
            )
        target = Path(os.path.realpath(path))
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path such as {path / 'predictions.json'}")
    if path.exists():
        mode = os.stat(path).st_mode
        kind = next((name for test, name in _KINDS if test(mode)), None)
        if kind is not None:
            raise OutputPathError(
                f"{flag} {path} is {kind}, not a regular file; refusing to replace it: give the path of a file"
            )
    folder = existing_folder(target.parent)
    if not folder.is_dir():
        raise OutputPathError(f"cannot create the folder of {flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {flag} {path}: folder {folder} is not writable")
    return OutputPath(flag, path, target, link)


def link_notes(outputs: Iterable[OutputPath]) -> list[str]:
    """One line per output given as a symbolic link, saying which file is written (for the user to see).

    Args:
      outputs: the checked outputs.
    Returns:
      The lines."""
    return [
        f"note: {out.flag} {out.path} is a symbolic link; writing the file it points to, {out.target}"
        for out in outputs
        if out.link
    ]


def _identity(path: PathLike) -> tuple:
    """What makes two paths the same file: device and inode when it exists (hard links included), else the
    resolved path."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("file", st.st_dev, st.st_ino)


def check_outputs(
    outputs: Mapping[str, PathLike | None], inputs: Iterable[tuple[str, PathLike]] = ()
) -> list[OutputPath]:
    """The outputs ``{flag: path}`` that are given (None: not asked for), each checked (``check_output``),
    none sharing a file with another or with an input (``check_not_inputs``).

    Args:
      outputs: flag -> path (None: not asked for).
      inputs: ``(what it is, path)`` pairs the run reads.
    Returns:
      The checked outputs.
    Raises:
      OutputPathError: naming the flag and the path."""
    checked = [check_output(flag, path) for flag, path in outputs.items() if path is not None]
    seen: dict[tuple, OutputPath] = {}
    for out in checked:
        first = seen.setdefault(_identity(out.target), out)
        if first is not out:
            raise OutputPathError(
                f"{first.flag} and {out.flag} are the same file ({out.path}); give each output its own path"
            )
    check_not_inputs(checked, inputs)
    return checked


def check_not_inputs(outputs: Sequence[OutputPath], inputs: Iterable[tuple[str, PathLike]]) -> None:
    """Raise OutputPathError if an output is one of ``inputs`` (``(what it is, path)`` pairs): writing it would
    replace what the run reads.

    Args:
      outputs: the checked outputs.
      inputs: ``(what it is, path)`` pairs the run reads.
    Raises:
      OutputPathError: naming the output and the input."""
    by_file = {_identity(out.target): out for out in outputs}
    for what, path in inputs:
        out = by_file.get(_identity(path))
        if out is not None:
            raise OutputPathError(
                f"{out.flag} {out.path} is {what} ({path}), an input of this run; writing it would replace the "
                "input: give another path"
            )
