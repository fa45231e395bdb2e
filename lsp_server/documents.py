"""A strict document store: the server's own copy of every open document.

pygls's store silently duplicates text on a reversed range, splits lines with `str.splitlines()` (so form
feed and U+2028 shift every later line) and clamps out-of-range positions. LSP knows only `\\n`, `\\r\\n`
and `\\r` as line ends; a malformed edit batch is rejected whole, the previous text and version are kept
and the document is marked desynced until the next full-text change or didOpen.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass, field

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


@dataclass
class Document:
    uri: str
    language_id: str
    version: int
    text: str
    desynced: bool = False
    _starts: list[int] | None = field(default=None, repr=False)
    _binary: tuple[int, bool] | None = field(default=None, repr=False)

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
        if self._starts is None:
            self._starts = line_starts(self.text)
        return self._starts

    def line_content_end(self, line: int) -> int:
        """Offset of the end of `line`'s content (before its line end)."""
        starts = self.starts
        if line + 1 < len(starts):
            end = starts[line + 1]
            if self.text[end - 2 : end] == "\r\n":
                return end - 2
            return end - 1
        return len(self.text)

    def offset_at(self, line: int, character: int, encoding: str, *, strict: bool = False) -> int:
        """Offset in code points of an LSP position. Lenient mode clamps (for read-only requests)."""
        starts = self.starts
        if line < 0:
            if strict:
                raise InvalidEdit(f"negative line {line}")
            return 0
        if line >= len(starts):
            if strict:
                raise InvalidEdit(f"line {line} past the end of the document ({len(starts)} lines)")
            return len(self.text)
        start = starts[line]
        line_text = self.text[start : self.line_content_end(line)]
        return start + column_to_index(line_text, character, encoding, strict=strict)

    def position_at(self, offset: int, encoding: str) -> tuple[int, int]:
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.starts, offset) - 1
        start = self.starts[line]
        return line, index_to_column(self.text[start : self.line_content_end(line)], offset - start, encoding)


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


def _apply(doc: Document, text: str, changes: list[TextChange], encoding: str) -> Document:
    scratch = Document(doc.uri, doc.language_id, doc.version, text)
    if text is doc.text:
        scratch._starts = doc._starts
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
            replaced = scratch.text[start:end]
            units = sum(_units(ch, UTF16) for ch in replaced)
            if units != change.range_length and len(replaced) != change.range_length:
                raise InvalidEdit(f"rangeLength {change.range_length} does not match the range ({units})")
        text = scratch.text[:start] + change.text + scratch.text[end:]
        edited = Document(doc.uri, doc.language_id, doc.version, text)
        edited._starts = _edited_starts(scratch, sl, el, start, end, change.text)
        scratch = edited
    return scratch


def _edit_offset(doc: Document, line: int, character: int, encoding: str) -> int:
    if line == len(doc.starts) and character == 0:
        return len(doc.text)
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
            edited = _apply(doc, doc.text, changes, encoding)
        except InvalidEdit as exc:
            if not doc.desynced:
                log.warning("rejected an edit batch for %s (%s); AI features paused until a full sync", uri, exc)
            doc.desynced = True
            raise
        full_sync = any(c.range is None for c in changes)
        doc.text = edited.text
        doc.version = version
        doc._starts = edited._starts  # kept up to date by the edit, or None: recomputed when needed
        if full_sync and doc.desynced:
            doc.desynced = False
        return doc
