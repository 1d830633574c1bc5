"""Log files of the processes ``azu up`` supervises: ``<state dir>/logs/<name>.log``, kept bounded.

Children write their logs straight to a file through their stdout (opened in append mode), so nothing sits
between a child and its log. Two bounds:

- at startup every ``name.log`` of the previous run is shifted: ``name.log`` -> ``name.1.log`` -> ... ->
  ``name.<keep>.log``; older files are deleted (``rotate_all``);
- while running, a log over ``max_bytes`` is copied to ``name.1.log`` (the same shift) and truncated in place
  (``cap``), the way logrotate's ``copytruncate`` works: the child keeps its descriptor, and because it was
  opened with O_APPEND its next write lands at the start of the emptied file. Lines written between the copy
  and the truncation are lost (a few at most); that is the price of needing no log-shipping process.

So a process's logs take at most ``(keep + 1) * max_bytes`` on disk.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_NUMBERED = re.compile(r"^(?P<stem>.+)\.(?P<n>\d+)\.log$")


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name[:-len('.log')]}.{n}.log")


def current_logs(folder: Path) -> list[Path]:
    """The live ``name.log`` files of ``folder`` (not the rotated ``name.N.log``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.log") if p.is_file() and not _NUMBERED.match(p.name))


def rotate(path: Path, *, keep: int, copy: bool = False) -> None:
    """Shift ``path`` (``name.log``) to ``name.1.log``, earlier ones up by one, dropping those past ``keep``.

    ``copy``: the file is open in a running child: copy it, then truncate it in place. ``keep`` 0: no
    history, the log is just emptied (or removed at startup)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    stem = path.name[:-len(".log")]
    for old in path.parent.glob(f"{glob_escape(stem)}.*.log"):
        m = _NUMBERED.match(old.name)
        if m and m["stem"] == stem and int(m["n"]) >= max(keep, 1):
            old.unlink(missing_ok=True)  # the oldest kept one makes room; any beyond keep (keep was lowered)
    if keep > 0:
        for n in range(keep - 1, 0, -1):
            if _numbered(path, n).exists():
                _numbered(path, n).replace(_numbered(path, n + 1))
    if copy:
        if keep > 0:
            shutil.copyfile(path, _numbered(path, 1))
        os.truncate(path, 0)
    elif keep > 0:
        path.replace(_numbered(path, 1))
    else:
        path.unlink()


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a glob pattern."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def rotate_all(folder: Path, *, keep: int) -> None:
    """At startup: every process's log of the previous run becomes ``name.1.log`` (see ``rotate``)."""
    for path in current_logs(folder):
        rotate(path, keep=keep)


def cap(folder: Path, *, max_bytes: int, keep: int) -> list[Path]:
    """While running: rotate (copy and truncate) every log larger than ``max_bytes``; 0 turns it off.

    Returns the logs it rotated."""
    if max_bytes <= 0:
        return []
    over = [p for p in current_logs(folder) if p.stat().st_size > max_bytes]
    for path in over:
        rotate(path, keep=keep, copy=True)
    return over
