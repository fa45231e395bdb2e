"""The differential state machine of the document store (reliability.md C2-C4): the strict store against a
reference written as plainly as possible from the LSP specification, in each position encoding, with and
without the chunked representation of long documents. Used by tests/test_sync_properties.py (CI sessions)
and scripts/fuzz_documents.py (long runs); needs hypothesis and lsp_server.documents only.
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, InvalidEdit, TextChange

URI = "file:///p/doc.py"
CI_SESSIONS = int(os.environ.get("OFFPILOT_SYNC_SESSIONS", "100"))
"""Sessions per machine in CI (scripts/fuzz_documents.py runs 10,000)."""

# Every kind of character that has broken a document store somewhere: line ends LSP knows (\n, \r\n, a
# lone \r) and those it does not (\f, \v, U+2028/2029, NEL), emoji outside the BMP (surrogate pairs in
# UTF-16, 4 bytes in UTF-8), a ZWJ sequence, CJK, a combining mark, NUL, U+FFFD.
PIECES = [
    "a", "b", "z", " ", "\t", "=", "(", ")", "\n", "\n", "\r\n", "\r", "\f", "\v", "\u2028", "\u2029", "\x85", "\x00",
    "😀", "👨\u200d👩\u200d👧", "名前", "値", "e\u0301", "é", "\ufffd", "ß", "\U0001f1ef\U0001f1f5",
]
text_st = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


# ---- the reference: as plain as possible, from the LSP specification ----------------------------------------
def ref_split(text: str) -> list[str]:
    """Lines with their line ends; a text ending in a line end has an empty last line."""
    parts = re.split(r"(\r\n|\r|\n)", text)
    return [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]


def ref_units(s: str, encoding: str) -> bytes:
    return s.encode({UTF8: "utf-8", UTF16: "utf-16-le", UTF32: "utf-32-le"}[encoding], "surrogatepass")


UNIT = {UTF8: 1, UTF16: 2, UTF32: 4}


def ref_offset(text: str, line: int, character: int, encoding: str) -> int:
    """Offset (code points) of a position; ValueError for anything that is not exactly a position."""
    lines = ref_split(text)
    if line < 0 or character < 0:
        raise ValueError("negative")
    if line == len(lines) and character == 0:  # the end-of-document position after a final line end
        return len(text)
    if line >= len(lines):
        raise ValueError("line past the end")
    content = re.sub(r"(\r\n|\r|\n)$", "", lines[line])
    raw = ref_units(content, encoding)
    if character * UNIT[encoding] > len(raw):
        raise ValueError("past the end of the line")
    codec = {UTF8: "utf-8", UTF16: "utf-16-le", UTF32: "utf-32-le"}[encoding]
    head = raw[: character * UNIT[encoding]].decode(codec)  # UnicodeDecodeError (a ValueError) mid-sequence
    return sum(len(ln) for ln in lines[:line]) + len(head)


def ref_apply(text: str, changes: list[TextChange], encoding: str) -> str:
    for change in changes:
        if change.range is None:
            text = change.text
            continue
        (sl, sc), (el, ec) = change.range
        if (el, ec) < (sl, sc):  # positions, not offsets: (1, 0)-(0, 0) on "" is reversed though both are offset 0
            raise ValueError("reversed")
        start, end = ref_offset(text, sl, sc, encoding), ref_offset(text, el, ec, encoding)
        old = text[start:end]
        if change.range_length is not None and change.range_length not in (len(ref_units(old, UTF16)) // 2, len(old)):
            raise ValueError("rangeLength")
        text = text[:start] + change.text + text[end:]
    return text


def ref_position(text: str, offset: int, encoding: str) -> tuple[int, int]:
    lines = ref_split(text)
    seen = 0
    for number, line in enumerate(lines):
        content = re.sub(r"(\r\n|\r|\n)$", "", line)
        if offset < seen + len(line) or number == len(lines) - 1:  # inside a \r\n: the end of the content
            return number, len(ref_units(content[: offset - seen], encoding)) // UNIT[encoding]
        seen += len(line)
    return len(lines) - 1, 0


# ---- the differential state machine (C2, C3, C4) ---------------------------------------------------------------
class SyncMachine(RuleBasedStateMachine):
    encoding = UTF16

    @initialize(text=text_st)
    def open(self, text):
        self.store = DocumentStore()
        self.store.open(URI, "python", 1, text)
        self.ref_text, self.ref_version, self.ref_desynced = text, 1, False
        self.rejected = self.accepted = 0

    def _position(self, data, text: str, exact: bool) -> tuple[int, int]:
        """A position in the negotiated encoding: usually a real one (found by the reference from an offset),
        sometimes any small pair of numbers (past the end, inside a character)."""
        if exact or data.draw(st.integers(0, 4)):
            offset = data.draw(st.integers(0, len(text)))
            return ref_position(text, offset, self.encoding)
        lines = len(ref_split(text))
        return data.draw(st.integers(0, lines + 1)), data.draw(st.integers(0, 12))

    def _change(self, data, text: str) -> TextChange:
        if data.draw(st.integers(0, 9)) == 0:
            return TextChange(data.draw(text_st))
        a = self._position(data, text, exact=False)
        b = self._position(data, text, exact=False)
        if data.draw(st.integers(0, 5)):  # mostly ordered; sometimes reversed as drawn
            a, b = min(a, b), max(a, b)
        length = None
        if data.draw(st.booleans()):
            try:
                start, end = ref_offset(text, *a, self.encoding), ref_offset(text, *b, self.encoding)
                length = len(ref_units(text[start:end], UTF16)) // 2 if start <= end else 0
            except ValueError:
                length = 0
            length += data.draw(st.sampled_from([0, 0, 0, 1, 7]))
        return TextChange(data.draw(text_st), (a, b), length)

    def _send(self, version: int, changes: list[TextChange], uri: str = URI) -> None:
        doc = self.store.get(URI)
        try:
            expected = ref_apply(self.ref_text, changes, self.encoding) if version > self.ref_version and uri == URI else None
        except ValueError:
            expected = None
        try:
            self.store.change(uri, version, changes, self.encoding)
        except InvalidEdit:
            assert expected is None, f"rejected a valid batch {changes!r} (v{version}) on {self.ref_text!r}"
            self.rejected += 1
            if uri == URI:
                self.ref_desynced = True
            # Rejected whole: the text and the version are those from before the batch.
            assert doc.text == self.ref_text and doc.version == self.ref_version and doc.desynced
            return
        assert expected is not None, f"accepted an invalid batch {changes!r} (v{version}) on {self.ref_text!r}"
        self.accepted += 1
        self.ref_text, self.ref_version = expected, version
        if any(c.range is None for c in changes):
            self.ref_desynced = False

    @rule(data=st.data())
    def edit_batch(self, data):
        changes = [self._change(data, self.ref_text)]
        for _ in range(data.draw(st.integers(0, 2))):
            try:
                scratch = ref_apply(self.ref_text, changes, self.encoding)
            except ValueError:
                scratch = self.ref_text
            changes.append(self._change(data, scratch))
        self._send(self.ref_version + data.draw(st.integers(1, 3)), changes)

    @rule(data=st.data())
    def one_valid_edit(self, data):
        """Exact positions in the encoding, start before end: must always be accepted."""
        a = self._position(data, self.ref_text, exact=True)
        b = self._position(data, self.ref_text, exact=True)
        change = TextChange(data.draw(text_st), (min(a, b), max(a, b)))
        before = self.rejected
        self._send(self.ref_version + 1, [change])
        assert self.rejected == before

    @rule(data=st.data())
    def stale_version(self, data):
        """C4: a version that is not newer is a desync, whatever the edit."""
        before = self.rejected
        self._send(self.ref_version - data.draw(st.integers(0, 2)), [TextChange("x", ((0, 0), (0, 0)))])
        assert self.rejected == before + 1

    @rule()
    def unknown_uri(self):
        try:
            self.store.change("file:///p/never-opened.py", self.ref_version + 1, [TextChange("x")], self.encoding)
            raise AssertionError("a change to a document never opened was accepted")
        except InvalidEdit:
            pass
        assert self.store.get("file:///p/never-opened.py") is None and len(self.store) == 1

    @precondition(lambda self: any(ord(c) > 0xFFFF for c in self.ref_text) and self.encoding != UTF32)
    @rule(data=st.data())
    def inside_a_character(self, data):
        """C3: a position inside a surrogate pair (UTF-16) or a UTF-8 sequence is rejected."""
        offsets = [i for i, c in enumerate(self.ref_text) if ord(c) > 0xFFFF]
        i = data.draw(st.sampled_from(offsets))
        line, col = ref_position(self.ref_text, i, self.encoding)
        before = self.rejected
        self._send(self.ref_version + 1, [TextChange("X", ((line, col + 1), (line, col + 1)))])
        assert self.rejected == before + 1

    @invariant()
    def same_text_as_the_reference(self):
        doc = self.store.get(URI)
        assert doc.text == self.ref_text
        assert doc.version == self.ref_version
        assert doc.desynced == self.ref_desynced
        # Positions round-trip through the store's own conversions.
        for offset in range(0, len(doc.text) + 1, max(1, len(doc.text) // 5)):
            if doc.text[offset - 1 : offset + 1] == "\r\n":
                continue  # not a position
            line, col = doc.position_at(offset, self.encoding)
            assert (line, col) == ref_position(doc.text, offset, self.encoding)
            assert doc.offset_at(line, col, self.encoding, strict=True) == offset


MACHINE_SETTINGS = settings(
    max_examples=CI_SESSIONS, stateful_step_count=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


class SyncUtf8(SyncMachine):
    encoding = UTF8


class SyncUtf16(SyncMachine):
    encoding = UTF16


class SyncUtf32(SyncMachine):
    encoding = UTF32


class Chunked:
    """The same sessions with every document kept as chunks of 4 characters (long documents' representation):
    edits across chunk boundaries, a \r\n meeting at one, chunks emptied."""

    @initialize(text=text_st)
    def open(self, text):
        import lsp_server.documents as documents

        self._saved = documents.CHUNKED_MIN_CHARS, documents.CHUNK_CHARS
        documents.CHUNKED_MIN_CHARS, documents.CHUNK_CHARS = 0, 4
        super().open(text)

    def teardown(self):
        import lsp_server.documents as documents

        if hasattr(self, "_saved"):
            documents.CHUNKED_MIN_CHARS, documents.CHUNK_CHARS = self._saved


class SyncChunkedUtf8(Chunked, SyncMachine):
    encoding = UTF8


class SyncChunkedUtf16(Chunked, SyncMachine):
    encoding = UTF16



MACHINES = [SyncUtf8, SyncUtf16, SyncUtf32, SyncChunkedUtf8, SyncChunkedUtf16]
