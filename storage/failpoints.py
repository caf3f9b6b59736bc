"""Failpoints: named places where a test can make the process die or an I/O call fail.

Kills: set ``IBSTREAM_FAILPOINT=<name>`` in a child process's environment and the process
exits at once (``os._exit``, like SIGKILL: no flush, no cleanup) when it reaches that point.
Every point is listed in proto_docs/storage-layout.md (failpoints); the buffer's are
``segment.before_fsync`` and, for coalescing a closed segment, ``coalesce.mid_write`` (its copy
half written), ``coalesce.before_rename`` (copy fsynced and verified) and
``coalesce.after_rename`` (renamed over the original, folder not yet fsynced); compaction's are
``compact.after_write_tmp``, ``compact.after_rename``, ``compact.after_index``,
``compact.after_move`` and ``compact.after_unlink`` (see storage/compaction.py); the IB-Stream
import's is ``import.after_stream`` (a stream's hours published, the next not begun).

I/O faults (a portable stand-in for a full or failing disk, beside the real tmpfs tests):
:data:`io_faults` makes the named write points raise ``OSError`` (``ENOSPC`` by default),
optionally after writing part of the data (a torn write), in this process; a child process
arms them with ``IBSTREAM_IO_FAULT=<point>[:<errno name>[:<bytes written first>]]``, e.g.
``segment.write:ENOSPC:100``. Points: ``segment.write``, ``segment.fsync``, ``segment.create``,
``coalesce.write``, ``coalesce.fsync``, ``archive.write``, ``compact.write``, ``index.write``. Unarmed, a point costs
one dict lookup.
"""

from __future__ import annotations

import errno as errno_module
import os
import threading
from dataclasses import dataclass

ENV = "IBSTREAM_FAILPOINT"
IO_ENV = "IBSTREAM_IO_FAULT"
EXIT_CODE = 77


def failpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(EXIT_CODE)


@dataclass
class _Fault:
    errno: int
    partial_bytes: int | None  # write this many bytes of the data before failing (a torn write)
    remaining: int | None  # fail this many more times, then disarm (None: until disarmed)


class IOFaults:
    """Armed I/O faults by point name; thread-safe."""

    def __init__(self) -> None:
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        spec = os.environ.get(IO_ENV)
        if spec:
            point, _, rest = spec.partition(":")
            name, _, partial = rest.partition(":")
            self.arm(point, getattr(errno_module, name or "ENOSPC"), partial_bytes=int(partial) if partial else None)

    def arm(self, point: str, error: int = errno_module.ENOSPC, *, partial_bytes: int | None = None,
            times: int | None = None) -> None:
        with self._lock:
            self._faults[point] = _Fault(error, partial_bytes, times)

    def disarm(self, point: str | None = None) -> None:
        with self._lock:
            if point is None:
                self._faults.clear()
            else:
                self._faults.pop(point, None)

    def armed(self, point: str) -> bool:
        with self._lock:
            return point in self._faults

    def check(self, point: str) -> _Fault | None:
        """The fault to raise at ``point`` now, if one is armed (counting it down)."""
        if not self._faults:
            return None
        with self._lock:
            fault = self._faults.get(point)
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[point]
            return fault

    def raise_if_armed(self, point: str) -> None:
        fault = self.check(point)
        if fault is not None:
            raise OSError(fault.errno, f"{os.strerror(fault.errno)} (injected at {point})")


io_faults = IOFaults()


def write_all(fd: int, data: bytes | memoryview, offset: int, point: str) -> None:
    """``pwrite`` all of ``data`` at ``offset``, honouring an armed fault at ``point``."""
    view = memoryview(data)
    fault = io_faults.check(point)
    if fault is not None:
        if fault.partial_bytes:
            os.pwrite(fd, view[: fault.partial_bytes], offset)
        raise OSError(fault.errno, f"{os.strerror(fault.errno)} (injected at {point})")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def fsync(fd: int, point: str) -> None:
    io_faults.raise_if_armed(point)
    os.fsync(fd)
