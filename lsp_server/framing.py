"""LSP base-protocol framing (`Content-Length: N\\r\\n\\r\\n` + N bytes), strict about sizes, lenient about junk.

pygls's own reader waits for a body of any declared size (a `Content-Length: 2000000000` wedges the
stream, and its buffered `read(n)` reserves n bytes first) and loses frames after a bad header. This one:

- refuses a declared size above `max_body_bytes` before reading a byte of it (`FrameTooLarge`; on stdio
  the server logs it and exits 1, as no later byte boundary can be trusted);
- drops a header block whose `Content-Length` is missing or not a number, and finds the next frame by
  its `Content-Length:` (a stray byte run does not cost the frame after it);
- takes the last of repeated `Content-Length` headers (clangd's rule), ignores other headers;
- reads in bounded chunks, so memory follows the bytes that arrive, never the size a header claims;
- ends (returns None) at end of input, also inside a truncated final frame.

Plain Python over a `read(n) -> bytes` callable: no pygls, no event loop, so it is fuzzed directly.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("offpilot.framing")

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Largest message accepted (a 10 MB document sent whole as JSON stays well inside)."""
MAX_HEADER_LINE = 8 * 1024
"""A header line longer than this is junk: it is skipped without being kept whole in memory."""
READ_CHUNK = 64 * 1024
_KEY = b"content-length:"


class FrameTooLarge(Exception):
    def __init__(self, declared: int, limit: int) -> None:
        super().__init__(f"a message declares Content-Length {declared} (limit {limit})")
        self.declared = declared
        self.limit = limit


class FrameReader:
    """Pull frames' bodies off a byte stream: `next_body()` → bytes, or None at end of input."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self._read = read
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._eof = False
        self._on_drop = on_drop or (lambda reason: log.warning("dropped input: %s", reason))
        self.frames = 0
        self.dropped = 0
        self.truncated_at_eof = False

    # ---- bytes --------------------------------------------------------------------------------------
    def _fill(self, want: int = READ_CHUNK) -> bool:
        if self._eof:
            return False
        data = self._read(max(1, want))
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self._on_drop(reason)

    def _line(self) -> bytes | None:
        """The next line without its end (\\n or \\r\\n); None at end of input with nothing left."""
        scanned = 0
        while True:
            nl = self._buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > MAX_HEADER_LINE:
                # Junk with no line end: keep only a tail where a `Content-Length:` may be starting.
                at = bytes(self._buf).lower().rfind(_KEY)
                keep = len(self._buf) - at if at >= 0 else len(_KEY) - 1
                if at < 0 or keep > MAX_HEADER_LINE:
                    keep = len(_KEY) - 1
                del self._buf[: len(self._buf) - keep]
                self._drop(f"a header line longer than {MAX_HEADER_LINE} bytes")
            scanned = max(0, len(self._buf) - 1)
            if not self._fill():
                if not self._buf:
                    return None
                line = bytes(self._buf)
                self._buf.clear()
                return line

    def _body(self, length: int) -> bytes | None:
        while len(self._buf) < length:
            if not self._fill(min(length - len(self._buf), 1024 * 1024)):
                return None
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return body

    # ---- frames -------------------------------------------------------------------------------------
    def next_body(self) -> bytes | None:
        """The next frame's body. Raises FrameTooLarge (nothing of that body is read)."""
        while True:
            length: int | None = None
            bad_length = False
            in_headers = False
            while True:
                line = self._line()
                if line is None:
                    if in_headers:
                        self.truncated_at_eof = True
                        log.info("input ended inside a message's headers")
                    return None
                if not line.strip():
                    if in_headers:
                        break
                    continue  # blank lines between frames
                at = line.lower().find(_KEY)
                if at > 0:
                    self._drop("bytes before a Content-Length header")
                    line = line[at:]
                if at >= 0:
                    value = line[len(_KEY):].strip()
                    if length is not None or bad_length:
                        log.warning("repeated Content-Length header: the last one (%r) is used", value[:32])
                    if value.isdigit():  # ASCII digits only; any run of them is a size (maybe absurd)
                        length, bad_length = (int(value) if len(value) <= 30 else 10**30), False
                    else:
                        length, bad_length = None, True
                    in_headers = True
                elif _is_header(line):
                    in_headers = True  # Content-Type and the like, before or after Content-Length
                else:
                    if in_headers:
                        self._drop("a header block interrupted by a non-header line")
                    else:
                        self._drop("bytes outside any message")
                    length, bad_length, in_headers = None, False, False
            if bad_length:
                self._drop("a Content-Length that is not a number")
                continue
            if length is None:
                self._drop("a header block without Content-Length")
                continue
            if length > self.max_body_bytes:
                raise FrameTooLarge(length, self.max_body_bytes)
            body = self._body(length)
            if body is None:
                self.truncated_at_eof = True
                log.info("input ended inside a message (%d bytes declared)", length)
                return None
            self.frames += 1
            return body


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _is_header(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and all(c in _TOKEN for c in name)
