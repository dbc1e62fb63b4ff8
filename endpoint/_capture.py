"""Where a worker's stdout and stderr go: two files per worker slot, read back per task.

The pool makes a private folder when it runs and removes it when it stops; each slot has
its two files in it. A worker started in the slot gets their paths on its command line,
empties them, and points its fd 1 and fd 2 at them (appending): whatever writes to fd 1
or 2 (``print``, C code, a subprocess) lands there. When a task ends (done, or its worker
died or was killed), the pool takes the tail of both and empties them, before the slot's
worker can get its next task: so they hold one task's output, and nothing of one task
mixes with another's.

The pool empties them, not the worker at each task: most tasks write nothing, and a
size check (an ``lseek``, well under a microsecond) is all such a task costs, where two
``ftruncate`` per task cost about 10 us of the worker's time (measured on a Firecracker
VM). A worker empties them once, when it starts, for what a cancelled task left (a
cancel reads nothing).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from heartline._output import tail_text


class OutputFolder:
    """The pool's private folder of output files (mode 0700), removed by :meth:`remove`."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="heartline-output-")

    def slot(self, slot: int) -> OutputFiles:
        """The output files of one worker slot (made if they are new)."""
        return OutputFiles(os.path.join(self.path, f"worker-{slot}"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class OutputFiles:
    """The stdout and stderr files of one worker slot, open for the pool to read and empty.

    Args:
        stem: The files' path without their suffixes ``.stdout`` and ``.stderr``.
    """

    __slots__ = ("_fds", "stderr_path", "stdout_path")

    def __init__(self, stem: str) -> None:
        self.stdout_path = f"{stem}.stdout"
        self.stderr_path = f"{stem}.stderr"
        self._fds = (
            os.open(self.stdout_path, os.O_RDWR | os.O_CREAT, 0o600),
            os.open(self.stderr_path, os.O_RDWR | os.O_CREAT, 0o600),
        )

    def take(self, limit: int) -> tuple[str, str]:
        """The last ``limit`` bytes of the stdout and of the stderr as text (see
        ``heartline._output.tail_text``; "" for each when ``limit`` is 0), and both files
        emptied for the next task."""
        out, err = self._fds
        return _take(out, limit), _take(err, limit)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)


def _take(fd: int, limit: int) -> str:
    # Most tasks print nothing: one lseek (a fraction of an fstat's cost), no read or write.
    size = os.lseek(fd, 0, os.SEEK_END)
    if not size:
        return ""
    text = ""
    if limit:
        start = max(0, size - limit)
        text = tail_text(os.pread(fd, size - start, start), start)
    # The worker appends (O_APPEND): its next write lands at the new end, 0.
    os.ftruncate(fd, 0)
    return text
