"""The parent's reader of a child's pipe: many messages a read, none lost, torn or reordered."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import struct
import threading

import pytest

from monitor.pipe_reader import PipeReader
from monitor.slots import FrameReady


def _read_all(reader: PipeReader, count: int) -> tuple[list[object], int]:
    """Messages until ``count`` came, and how many ``read`` calls that took."""
    got: list[object] = []
    calls = 0
    while len(got) < count:
        messages, _ = reader.read()
        got += messages
        calls += 1
    return got, calls


def test_many_messages_sent_with_connection_send_come_out_in_order_in_few_reads():
    reader_end, writer_end = mp.Pipe(duplex=False)
    sent = [FrameReady(seq, seq % 4, 1000.0 + seq, 1080, 1920) for seq in range(300)]
    for message in sent:
        writer_end.send(message)
    got, calls = _read_all(PipeReader(reader_end.fileno()), len(sent))
    assert got == sent
    assert calls <= 2, "300 small messages waiting should take one read (two at a chunk's edge)"
    reader_end.close()
    writer_end.close()


def test_a_message_split_across_reads_waits_for_its_end():
    # A tiny chunk cuts every message (and its length header) in pieces: each still
    # comes out whole, once, after the read that completes it.
    reader_end, writer_end = mp.Pipe(duplex=False)
    sent = [("segment", "x" * n, n) for n in (0, 5, 3000, 70_000)]  # over 16 KiB: header and body apart
    writer = threading.Thread(target=lambda: [writer_end.send(m) for m in sent])
    writer.start()
    got, calls = _read_all(PipeReader(reader_end.fileno(), chunk=7), len(sent))
    writer.join()
    assert got == sent
    assert calls > len(sent)
    reader_end.close()
    writer_end.close()


def test_a_long_length_header_is_understood():
    # Messages over 2 GiB carry -1 and an 8-byte length (Connection's framing); a small
    # message framed that way checks the parsing without sending gigabytes.
    read_fd, write_fd = os.pipe()
    body = pickle.dumps({"big": True})
    os.write(write_fd, struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body)
    os.write(write_fd, struct.pack("!i", len(body)) + body)
    got, _ = _read_all(PipeReader(read_fd, chunk=5), 2)
    assert got == [{"big": True}, {"big": True}]
    os.close(read_fd)
    os.close(write_fd)


def test_the_end_of_the_pipe_is_eof_and_a_torn_last_message_is_an_error():
    reader_end, writer_end = mp.Pipe(duplex=False)
    writer_end.send("last")
    writer_end.close()
    reader = PipeReader(reader_end.fileno())
    assert reader.read()[0] == ["last"]
    with pytest.raises(EOFError):
        reader.read()
    reader_end.close()

    read_fd, write_fd = os.pipe()
    os.write(write_fd, struct.pack("!i", 100) + b"only part of it")  # the child died mid-message
    os.close(write_fd)
    torn = PipeReader(read_fd)
    assert torn.read()[0] == []
    with pytest.raises(OSError, match="end of file during message"):
        torn.read()
    os.close(read_fd)
