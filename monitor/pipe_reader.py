"""Reading a child's pipe many messages at a time.

``multiprocessing.connection.Connection.recv`` costs two ``read`` calls per
message (its length, then the message), and knowing whether one waits costs
a ``poll`` more. A decoder child sends a message per frame, so with many
cameras those system calls were a large part of the main process's work per
frame. ``PipeReader`` reads whatever the pipe holds in one ``os.read`` and
splits it on ``Connection``'s own framing: a 4-byte big-endian length (-1,
then an 8-byte length, for messages over 2 GiB), then the pickle. The
children keep using ``Connection.send``; only the parent's side changes.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


class PipeReader:
    """The reading end of a ``multiprocessing`` pipe (``Connection``'s framing), many messages a call.

    A message only partly in the pipe (the child is still writing it) waits in
    the reader for the rest, which arrives with the next call.

    Args:
        fd: The pipe's file descriptor (``Connection.fileno()``); the caller closes it.
        chunk: The most bytes one ``os.read`` takes.
    """

    def __init__(self, fd: int, chunk: int = 1 << 16) -> None:
        self._fd = fd
        self._chunk = chunk
        self._rest = b""  # the start of a message whose end is not read yet

    def read(self) -> tuple[list[Any], bool]:
        """The whole messages read by one ``os.read``, and whether the pipe may hold more.

        Call it only when the pipe is readable (``poll``): it blocks otherwise.

        Raises:
            EOFError: The other end closed the pipe (with a partial message: ``OSError``).
            OSError: Reading failed.
        """
        chunk = os.read(self._fd, self._chunk)
        if not chunk:
            if self._rest:
                raise OSError("got end of file during message")
            raise EOFError
        data = self._rest + chunk if self._rest else chunk
        messages = []
        at, end = 0, len(data)
        while end - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(data, at)
            head = _LENGTH.size
            if size == -1:
                if end - at < head + _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(data, at + head)
                head += _LONG_LENGTH.size
            if end - at - head < size:
                break
            messages.append(pickle.loads(data[at + head : at + head + size]))
            at += head + size
        self._rest = data[at:]
        return messages, len(chunk) == self._chunk
