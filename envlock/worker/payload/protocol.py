"""Length-prefixed JSON frames: 4-byte big-endian length, then UTF-8 JSON.

Shared by the host and the worker (standard library only). Arrays never travel in frames:
they go through .npy/.npz files, written without pickle.
"""

from __future__ import annotations

import json
import struct

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    pass


def encode(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=True).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError("frame too large: %d bytes" % len(body))
    return _HEADER.pack(len(body)) + body


def write_frame(stream, obj: object) -> None:
    stream.write(encode(obj))
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(stream):
    """The next frame's object, or None at a clean end of stream."""
    header = _read_exact(stream, _HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise ProtocolError("stream ended inside a frame header")
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError("frame too large: %d bytes" % length)
    body = _read_exact(stream, length)
    if len(body) < length:
        raise ProtocolError("stream ended inside a frame")
    return json.loads(body.decode("utf-8"))


class FrameDecoder:
    """Incremental decoder for the host, which reads with a deadline (select + os.read)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf.extend(data)
        out = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ProtocolError("frame too large: %d bytes" % length)
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(json.loads(bytes(self._buf[_HEADER.size:end]).decode("utf-8")))
            del self._buf[:end]
        return out
