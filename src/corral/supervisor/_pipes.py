"""Non-blocking pipe I/O for one worker, on the supervisor's event loop.

:class:`PipeWriter` writes request frames (directly when the pipe has room,
else buffered until it is writable) and reports a broken pipe once.
:class:`LogSink` drains a worker's stdout/stderr into the ``corral.worker``
logger, bounded in line length and rate, one escaped line per record. Neither
starts a task or a thread: both are ``add_writer``/``add_reader`` callbacks.
Reading the reply pipe is the handle's own job (see :mod:`corral.supervisor._handle`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from collections.abc import Callable

from corral._text import one_line

__all__ = ["LogSink", "PipeWriter"]

worker_log = logging.getLogger("corral.worker")

_LOG_LINE_MAX = 4096
_LOG_LINES_PER_SECOND = 200.0
_LOG_BURST = 1000.0


class PipeWriter:
    """Non-blocking writes to a pipe: direct when possible, else queued until writable.

    What is queued is kept by reference (the caller's buffers, or memoryviews of their
    unwritten ends), never copied: a 16 MiB argument goes out of the caller's bytes in
    pipe-sized writes. :meth:`write_soon` queues on purpose, so that a burst of frames
    written in one loop iteration costs one ``writev`` rather than a ``write`` (and a
    wake-up of the reader) per frame.
    """

    _IOV_MAX = 64  # buffers per writev

    def __init__(
        self, fd: int, loop: asyncio.AbstractEventLoop, on_broken: Callable[[], None]
    ) -> None:
        self._fd = fd
        self._loop = loop
        # Called once if the worker closed its end: from the loop, never from inside a
        # write, so a caller's own bookkeeping after write() always runs first.
        self._on_broken = on_broken
        self._queue: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._broken = False
        self._soon = False  # a flush is scheduled with call_soon
        self._waiting = False  # add_writer is registered: the pipe was full

    def write(self, *parts: bytes | bytearray) -> None:
        """Send ``parts`` in order, as one stream. The caller must not change them."""
        if self._broken or self._fd < 0:
            return
        if self._queue:
            self._queue.extend(memoryview(part) for part in parts if part)
            return
        try:
            n = os.write(self._fd, parts[0]) if len(parts) == 1 else os.writev(self._fd, parts)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE: the worker closed its end (or is gone)
            self._break()
            return
        for part in parts:
            if n >= len(part):
                n -= len(part)
                continue
            self._queue.append(memoryview(part)[n:])
            n = 0
        if self._queue:
            self._wait_writable()

    def write_soon(self, data: bytes) -> None:
        """Like :meth:`write`, but sent at the end of this loop iteration together with
        whatever else is written meanwhile."""
        if self._broken or self._fd < 0 or not data:
            return
        self._queue.append(data)
        if not self._soon and not self._waiting:
            self._soon = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = False
        if not self._waiting:  # else the writer callback flushes when there is room
            self._flush()

    def _flush(self) -> None:
        """Write what is queued until it is all out or the pipe is full."""
        queue = self._queue
        while queue:
            batch = list(itertools.islice(queue, self._IOV_MAX))
            try:
                n = os.writev(self._fd, batch)
            except BlockingIOError:
                break
            except OSError:
                self._break()
                return
            full = n < sum(map(len, batch))
            while queue and n >= len(queue[0]):  # the parts written out in full
                n -= len(queue.popleft())
            if n:
                queue[0] = memoryview(queue[0])[n:]
            if full:
                break
        if queue:
            self._wait_writable()
        elif self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._fd)

    def _wait_writable(self) -> None:
        if not self._waiting:
            self._waiting = True
            self._loop.add_writer(self._fd, self._flush)

    def _break(self) -> None:
        self._broken = True
        self._queue.clear()
        self._waiting = False
        self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._on_broken)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._waiting = False
        self._queue.clear()


class LogSink:
    """Drains a worker's stdout/stderr into logging, line by line, bounded in
    line length and rate (a flooding kernel loses lines, not the supervisor).

    Each line is one record, ``[tenant] text``, with ``tenant`` and ``pid`` extras; its
    text is escaped (:func:`corral._text.one_line`) if it holds anything but printable
    characters, so a kernel's output cannot forge a record or drive a terminal."""

    def __init__(self, fd: int, tenant: str, pid: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self.tenant = tenant  # "" for a spare until it is bound
        self._pid = pid
        self._loop = loop
        self._partial = b""
        self._tokens = _LOG_BURST
        self._stamp = time.monotonic()
        self._dropped = 0
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._release()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _LOG_LINE_MAX:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        now = time.monotonic()
        self._tokens = min(_LOG_BURST, self._tokens + (now - self._stamp) * _LOG_LINES_PER_SECOND)
        self._stamp = now
        if self._tokens < 1:
            self._dropped += 1
            return
        self._tokens -= 1
        # One record per line, whatever the kernel wrote: bytes that are not UTF-8 as
        # \xNN, control characters (CR, ESC, NUL, ...) escaped, so that nothing it prints
        # can start a line of its own, forge a record or drive the reader's terminal.
        text = one_line(line[:_LOG_LINE_MAX].decode("utf-8", "backslashreplace"))
        self._report_dropped()
        worker_log.info(
            "[%s] %s", self.tenant, text, extra={"tenant": self.tenant, "pid": self._pid}
        )

    def _report_dropped(self) -> None:
        if self._dropped:
            worker_log.warning(
                "[%s] %d output lines dropped (rate limit)",
                self.tenant,
                self._dropped,
                extra={"tenant": self.tenant, "pid": self._pid},
            )
            self._dropped = 0

    def close(self) -> None:
        """Log what is already in the pipe (the last words of a crash), then close it."""
        for _ in range(16):  # bounded: a flooding grandchild could keep it full forever
            if self._fd < 0:
                return
            try:
                data = os.read(self._fd, 65536)
            except OSError:  # BlockingIOError: nothing more for now
                break
            if not data:
                break
            self._feed(data)
        self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self._partial:
                self._emit(self._partial)
                self._partial = b""
            self._report_dropped()
