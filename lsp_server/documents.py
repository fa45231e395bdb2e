"""A strict document store: the server's own copy of every open document.

pygls's store silently duplicates text on a reversed range, splits lines with `str.splitlines()` (so form
feed and U+2028 shift every later line) and clamps out-of-range positions. LSP knows only `\\n`, `\\r\\n`
and `\\r` as line ends; a malformed edit batch is rejected whole, the previous text and version are kept
and the document is marked desynced until the next full-text change or didOpen.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"
ENCODINGS = (UTF8, UTF16, UTF32)
_LINE_END = re.compile(r"\r\n|\r|\n")


class InvalidEdit(ValueError):
    """An edit that cannot be applied to the document as it is."""


def _units(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    if encoding == UTF8:
        return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    return 1


def line_starts(text: str) -> list[int]:
    """Offsets (in code points) where each line begins, splitting only on LSP line ends."""
    return [0] + [m.end() for m in _LINE_END.finditer(text)]


def column_to_index(line_text: str, character: int, encoding: str, *, strict: bool) -> int:
    """Index into `line_text` for an LSP character offset; strict mode raises on anything inexact."""
    if character < 0:
        if strict:
            raise InvalidEdit(f"negative character {character}")
        return 0
    if encoding == UTF32:
        if character > len(line_text):
            if strict:
                raise InvalidEdit(f"character {character} past the end of the line ({len(line_text)})")
            return len(line_text)
        return character
    if encoding == UTF16 and line_text.isascii():
        return column_to_index(line_text, character, UTF32, strict=strict)
    seen = 0
    for index, ch in enumerate(line_text):
        if seen == character:
            return index
        seen += _units(ch, encoding)
        if seen > character:
            if strict:
                raise InvalidEdit(f"character {character} falls inside a {encoding} sequence")
            return index
    if seen == character:
        return len(line_text)
    if strict:
        raise InvalidEdit(f"character {character} past the end of the line ({seen})")
    return len(line_text)


def index_to_column(line_text: str, index: int, encoding: str) -> int:
    prefix = line_text[:index]
    if encoding == UTF32 or (encoding == UTF16 and prefix.isascii()):
        return len(prefix)
    return sum(_units(ch, encoding) for ch in prefix)


def looks_binary(text: str) -> bool:
    if not text:
        return False
    nul, replacement = text.count("\x00"), text.count("\ufffd")
    return nul * 1000 >= len(text) or replacement * 100 >= len(text)


CHUNKED_MIN_CHARS = 1_000_000
"""Documents at least this long are kept as chunks: one edit then copies a chunk, not the whole text (a
10 MB document took 14 ms per keystroke as one string; reliability.md C8 asks <= 5 ms)."""
CHUNK_CHARS = 16_384


def _breaks(text: str) -> int:
    """Line ends in `text` (\r\n counts once)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _split_chunks(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, never cutting a \r\n in two."""
    out, pos = [], 0
    while pos < len(text):
        end = min(len(text), pos + size)
        if text[end - 1 : end + 1] == "\r\n":
            end += 1
        out.append(text[pos:end])
        pos = end
    return out


class ChunkedText:
    """An immutable text as a list of chunks (no chunk boundary inside a \r\n), with each chunk's start offset
    and first line; `replace` shares every chunk but the one or two it edits."""

    __slots__ = ("chunks", "breaks", "offsets", "first_lines", "length", "line_count", "_rel")

    def __init__(self, chunks: list[str], breaks: list[int] | None = None, rel: dict[int, list[int]] | None = None) -> None:
        self.chunks = chunks
        self.breaks = breaks if breaks is not None else [_breaks(c) for c in chunks]
        self.offsets = list(itertools.accumulate(map(len, chunks), initial=0))
        self.first_lines = list(itertools.accumulate(self.breaks, initial=0))
        self.length = self.offsets.pop()
        self.line_count = self.first_lines.pop() + 1
        self._rel: dict[int, list[int]] = rel if rel is not None else {}

    @classmethod
    def from_text(cls, text: str, size: int = 0) -> "ChunkedText":
        return cls(_split_chunks(text, size or CHUNK_CHARS))

    def text(self) -> str:
        return "".join(self.chunks)

    def _starts_in(self, c: int) -> list[int]:
        """Offsets (relative to chunk c) just after each line end in it."""
        rel = self._rel.get(c)
        if rel is None:
            rel = self._rel[c] = [m.end() for m in _LINE_END.finditer(self.chunks[c])]
        return rel

    def _chunk_of(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self.offsets, offset) - 1)

    def line_start(self, line: int) -> int:
        if line <= 0 or not self.chunks:
            return 0
        # The chunk holding the line-th line end: first_lines[c] < line <= first_lines[c] + breaks[c].
        c = bisect.bisect_left(self.first_lines, line) - 1
        while self.first_lines[c] + self.breaks[c] < line:
            c += 1
        return self.offsets[c] + self._starts_in(c)[line - self.first_lines[c] - 1]

    def line_of(self, offset: int) -> int:
        if not self.chunks:
            return 0
        c = self._chunk_of(offset)
        return self.first_lines[c] + bisect.bisect_right(self._starts_in(c), offset - self.offsets[c])

    def slice(self, start: int, end: int) -> str:
        if end <= start or not self.chunks:
            return ""
        first, last = self._chunk_of(start), self._chunk_of(max(start, end - 1))
        base = self.offsets[first]
        if first == last:
            return self.chunks[first][start - base : end - base]
        return "".join(self.chunks[first : last + 1])[start - base : end - base]

    def replace(self, start: int, end: int, new: str) -> "ChunkedText":
        chunks, breaks = self.chunks, self.breaks
        if not chunks:
            return ChunkedText(_split_chunks(new, CHUNK_CHARS))
        lo, hi = self._chunk_of(start), self._chunk_of(max(start, end - 1))
        base = self.offsets[lo]
        joined = chunks[lo] if lo == hi else "".join(chunks[lo : hi + 1])
        piece = joined[: start - base] + new + joined[end - base :]
        # Keep \r\n whole: take in a neighbour that ends with \r or starts with \n (it may now join the piece).
        if lo > 0 and chunks[lo - 1].endswith("\r"):
            lo -= 1
            piece = chunks[lo] + piece
        if hi + 1 < len(chunks) and chunks[hi + 1].startswith("\n"):
            hi += 1
            piece = piece + chunks[hi]
        pieces = _split_chunks(piece, CHUNK_CHARS) if len(piece) > 2 * CHUNK_CHARS else ([piece] if piece else [])
        # The line starts found in the chunks this edit leaves alone stay valid (relative to their chunk).
        shift = len(pieces) - (hi + 1 - lo)
        rel = {(c if c < lo else c + shift): starts for c, starts in self._rel.items() if c < lo or c > hi}
        return ChunkedText(chunks[:lo] + pieces + chunks[hi + 1 :], breaks[:lo] + [_breaks(p) for p in pieces] + breaks[hi + 1 :], rel)


class Document:
    """One open document. Its text is a plain string, or for long documents a ChunkedText that is joined
    into a string only when something reads `text` (a request, not a keystroke)."""

    def __init__(self, uri: str, language_id: str, version: int, text: str, desynced: bool = False) -> None:
        self.uri = uri
        self.language_id = language_id
        self.version = version
        self.desynced = desynced
        self._text: str | None = text
        self._chunked: ChunkedText | None = None
        self._starts: list[int] | None = None
        self._binary: tuple[int, bool] | None = None

    def __repr__(self) -> str:
        return f"Document({self.uri!r}, {self.language_id!r}, version={self.version}, chars={self._length()}, desynced={self.desynced})"

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._chunked.text()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self._chunked, self._starts = value, None, None

    def copy(self) -> "Document":
        """A frozen copy (the store updates its Document in place on didChange)."""
        other = Document(self.uri, self.language_id, self.version, "", self.desynced)
        other._text, other._chunked, other._starts, other._binary = self._text, self._chunked, self._starts, self._binary
        return other

    def _length(self) -> int:
        return self._chunked.length if self._chunked is not None else len(self._text)

    def _slice(self, start: int, end: int) -> str:
        if self._chunked is not None:
            return self._chunked.slice(start, end)
        return self._text[start:end]

    def chunked(self) -> ChunkedText:
        if self._chunked is None:
            self._chunked = ChunkedText.from_text(self._text)
        return self._chunked

    def ai_off_reason(self) -> str:
        """Why AI features are off for this document ("" when they are on): its text is out of step with the
        client's (a rejected edit), or it looks binary (reliability.md C8: at least one NUL per 1,000 characters,
        or 1 % U+FFFD, as a file read with the wrong encoding gives). Counted once per version, at request time."""
        if self.desynced:
            return "the document is out of sync (a rejected edit); waiting for a full-text change"
        if self._binary is None or self._binary[0] != self.version:
            self._binary = (self.version, looks_binary(self.text))
        return "the document looks binary" if self._binary[1] else ""

    @property
    def starts(self) -> list[int]:
        """Offsets where each line starts (built from the whole text: for short documents and tools)."""
        if self._starts is None:
            self._starts = line_starts(self.text)
        return self._starts

    @property
    def line_count(self) -> int:
        return self._chunked.line_count if self._chunked is not None else len(self.starts)

    def line_start(self, line: int) -> int:
        return self._chunked.line_start(line) if self._chunked is not None else self.starts[line]

    def line_content_end(self, line: int) -> int:
        """Offset of the end of `line`'s content (before its line end)."""
        if line + 1 < self.line_count:
            end = self.line_start(line + 1)
            if self._slice(end - 2, end) == "\r\n":
                return end - 2
            return end - 1
        return self._length()

    def offset_at(self, line: int, character: int, encoding: str, *, strict: bool = False) -> int:
        """Offset in code points of an LSP position. Lenient mode clamps (for read-only requests)."""
        if line < 0:
            if strict:
                raise InvalidEdit(f"negative line {line}")
            return 0
        count = self.line_count
        if line >= count:
            if strict:
                raise InvalidEdit(f"line {line} past the end of the document ({count} lines)")
            return self._length()
        start = self.line_start(line)
        line_text = self._slice(start, self.line_content_end(line))
        return start + column_to_index(line_text, character, encoding, strict=strict)

    def position_at(self, offset: int, encoding: str) -> tuple[int, int]:
        offset = max(0, min(offset, self._length()))
        if self._chunked is not None:
            line = self._chunked.line_of(offset)
        else:
            line = bisect.bisect_right(self.starts, offset) - 1
        start = self.line_start(line)
        return line, index_to_column(self._slice(start, self.line_content_end(line)), offset - start, encoding)


@dataclass
class TextChange:
    """One entry of didChange's contentChanges; `range` is None for a full-text replacement."""

    text: str
    range: tuple[tuple[int, int], tuple[int, int]] | None = None
    range_length: int | None = None


def _edited_starts(doc: Document, first_line: int, last_line: int, start: int, end: int, new: str) -> list[int] | None:
    """The line starts after replacing [start, end) (on lines first_line..last_line) with `new`, from the old
    ones: recomputing them means a regex over the whole text, 3.4 ms per keystroke on a 5,000-line file.
    None (recompute) where a `\r` at the edit's edges could join or split a CRLF."""
    old = doc.text
    if "\r" in new or old[start - 1 : start] == "\r" or old[end - 1 : end] == "\r":
        return None
    starts = doc.starts
    inserted = [start + m.end() for m in _LINE_END.finditer(new)]
    delta = len(new) - (end - start)
    return starts[: first_line + 1] + inserted + [s + delta for s in starts[last_line + 1 :]]


def _apply(doc: Document, changes: list[TextChange], encoding: str) -> Document:
    """The document after a batch of changes, as a new Document; raises InvalidEdit at the first bad one."""
    scratch = doc.copy()
    for change in changes:
        if change.range is None:
            scratch = Document(doc.uri, doc.language_id, doc.version, change.text)
            continue
        (sl, sc), (el, ec) = change.range
        if (el, ec) < (sl, sc):
            raise InvalidEdit(f"reversed range {sl}:{sc}-{el}:{ec}")
        start = _edit_offset(scratch, sl, sc, encoding)
        end = _edit_offset(scratch, el, ec, encoding)
        if change.range_length is not None:
            replaced = scratch._slice(start, end)
            units = sum(_units(ch, UTF16) for ch in replaced)
            if units != change.range_length and len(replaced) != change.range_length:
                raise InvalidEdit(f"rangeLength {change.range_length} does not match the range ({units})")
        edited = Document(doc.uri, doc.language_id, doc.version, "")
        if scratch._chunked is not None or scratch._length() >= CHUNKED_MIN_CHARS:
            edited._text, edited._chunked = None, scratch.chunked().replace(start, end, change.text)
        else:
            edited._text = scratch.text[:start] + change.text + scratch.text[end:]
            edited._starts = _edited_starts(scratch, sl, el, start, end, change.text)
        scratch = edited
    return scratch


def _edit_offset(doc: Document, line: int, character: int, encoding: str) -> int:
    if line == doc.line_count and character == 0:
        return doc._length()
    return doc.offset_at(line, character, encoding, strict=True)


class DocumentStore:
    """Open documents by URI; only what the client opened is ever known (never read from disk)."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def open(self, uri: str, language_id: str, version: int, text: str) -> Document:
        doc = Document(uri, language_id, version, text)
        if len(text) >= CHUNKED_MIN_CHARS:
            doc.chunked()  # now, while the text is read anyway: not on the first keystroke (60 ms for 10 MB)
        self._docs[uri] = doc
        return doc

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def change(self, uri: str, version: int, changes: list[TextChange], encoding: str) -> Document:
        """Apply a didChange batch atomically. Raises InvalidEdit (and marks desync) when malformed."""
        doc = self._docs.get(uri)
        if doc is None:
            raise InvalidEdit(f"didChange for a document that is not open: {uri}")
        try:
            if version <= doc.version:
                raise InvalidEdit(f"version {version} is not newer than {doc.version}")
            edited = _apply(doc, changes, encoding)
        except InvalidEdit as exc:
            if not doc.desynced:
                log.warning("rejected an edit batch for %s (%s); AI features paused until a full sync", uri, exc)
            doc.desynced = True
            raise
        full_sync = any(c.range is None for c in changes)
        # Line starts are kept up to date by the edit, or None: recomputed when needed.
        doc._text, doc._chunked, doc._starts = edited._text, edited._chunked, edited._starts
        doc.version = version
        if doc._chunked is None and len(doc._text) >= CHUNKED_MIN_CHARS:
            doc.chunked()  # a long document sent whole: chunked now rather than on the next keystroke
        if full_sync and doc.desynced:
            doc.desynced = False
        return doc
