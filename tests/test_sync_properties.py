"""Document sync, positions and parsing (reliability.md C1-C8): the strict store against an independent
reference, tree-sitter's incremental trees against fresh parses, parse deadlines and hangs, and documents
that are huge, binary or in no known language.

The long runs live in scripts/fuzz_documents.py (same machine, more sessions).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from types import SimpleNamespace

from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lsp_raw import RawClient, inline_params
from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, InvalidEdit, TextChange

URI = "file:///p/doc.py"
CI_SESSIONS = int(os.environ.get("OFFPILOT_SYNC_SESSIONS", "100"))
"""Sessions per encoding in CI (scripts/fuzz_documents.py runs 10,000)."""

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
        start, end = ref_offset(text, sl, sc, encoding), ref_offset(text, el, ec, encoding)
        if end < start:
            raise ValueError("reversed")
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
        with pytest.raises(InvalidEdit):
            self.store.change("file:///p/never-opened.py", self.ref_version + 1, [TextChange("x")], self.encoding)
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


TestSyncUtf8 = SyncUtf8.TestCase
TestSyncUtf16 = SyncUtf16.TestCase
TestSyncUtf32 = SyncUtf32.TestCase
TestSyncChunkedUtf8 = SyncChunkedUtf8.TestCase
TestSyncChunkedUtf16 = SyncChunkedUtf16.TestCase
for _case in (TestSyncUtf8, TestSyncUtf16, TestSyncUtf32, TestSyncChunkedUtf8, TestSyncChunkedUtf16):
    _case.settings = MACHINE_SETTINGS
del _case


# ---- C3 table: each invalid edit named, against a document with every hard character ---------------------------
HARD = "a😀b\r\nc\u2028d\re\x85f\n名"


@pytest.mark.parametrize("encoding", [UTF8, UTF16, UTF32])
@pytest.mark.parametrize("name, change", [
    ("reversed range (ty#28548: must not give 'abcdXbcdef')", TextChange("X", ((0, 4), (0, 1)))),
    ("line past the end", TextChange("X", ((9, 0), (9, 0)))),
    ("character past the end of the line", TextChange("X", ((3, 99), (3, 99)))),
    ("rangeLength that does not match", TextChange("X", ((0, 0), (0, 1)), 5)),
])
def test_invalid_edits_are_rejected_whole(encoding, name, change):
    store = DocumentStore()
    doc = store.open(URI, "python", 3, HARD)
    with pytest.raises(InvalidEdit):
        store.change(URI, 4, [TextChange("ok", ((0, 0), (0, 0))), change], encoding)
    assert (doc.text, doc.version, doc.desynced) == (HARD, 3, True)


@pytest.mark.parametrize("encoding, character", [(UTF16, 2), (UTF8, 2), (UTF8, 3), (UTF8, 4)])
def test_a_position_inside_an_emoji_is_rejected(encoding, character):
    store = DocumentStore()
    doc = store.open(URI, "python", 1, HARD)
    with pytest.raises(InvalidEdit):
        store.change(URI, 2, [TextChange("X", ((0, character), (0, character)))], encoding)
    assert doc.text == HARD and doc.desynced


def test_a_desync_is_logged_once_and_cleared_by_a_full_text_change(caplog):
    store = DocumentStore()
    doc = store.open(URI, "python", 1, "abcdef")
    for version in (2, 3, 4):
        with pytest.raises(InvalidEdit):
            store.change(URI, version, [TextChange("X", ((0, 4), (0, 1)))], UTF16)
    assert sum("rejected an edit batch" in r.message for r in caplog.records) == 1
    store.change(URI, 5, [TextChange("fresh")], UTF16)
    assert (doc.text, doc.version, doc.desynced) == ("fresh", 5, False)


# ---- C5: read-only positions anywhere in [0, 2^31) -----------------------------------------------------------------
@settings(max_examples=400, deadline=None, derandomize=True)
@given(text=text_st, line=st.integers(-5, 2**31 - 1), character=st.integers(-5, 2**31 - 1),
       encoding=st.sampled_from([UTF8, UTF16, UTF32]))
def test_read_positions_are_clamped_never_raised(text, line, character, encoding):
    doc = DocumentStore().open(URI, "python", 1, text)
    offset = doc.offset_at(line, character, encoding)
    assert 0 <= offset <= len(text)
    lines = ref_split(text)
    if line >= len(lines):
        assert offset == len(text)
    elif line >= 0:  # clamped to the line: never past its content
        start = sum(len(x) for x in lines[:line])
        assert start <= offset <= start + len(re.sub(r"(\r\n|\r|\n)$", "", lines[line]))


async def test_requests_at_huge_positions_are_answered_not_failed():
    """inlineCompletion and codeAction with positions up to 2^31 - 1 get a result (clamped), never -32603."""
    client = await RawClient.start("--fake-engine", json.dumps({"outputs": ["1"]}))
    try:
        await client.initialize({"general": {"positionEncodings": ["utf-16"]}, "textDocument": {"inlineCompletion": {}}})
        await client.wait_ready()
        client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                                "text": "def f(x):\n    return 😀\n"}})
        rng = random.Random(5)
        for _ in range(20):
            line, character = rng.choice([0, 1, 2, 3, 2**31 - 1, rng.randrange(2**31)]), rng.randrange(2**31)
            reply = await client.request("textDocument/inlineCompletion", inline_params(URI, line, character))
            assert "result" in reply, reply
            rng_ = {"start": {"line": 0, "character": 0}, "end": {"line": line, "character": character}}
            reply = await client.request("textDocument/codeAction", {"textDocument": {"uri": URI}, "range": rng_, "context": {"diagnostics": []}})
            assert "result" in reply, reply
    finally:
        await client.close()


# ---- C6: the incremental tree equals a fresh parse -------------------------------------------------------------
from lsp_server.context import syntax  # noqa: E402
from lsp_server.context.syntax import ParseTimeout, TreeCache, parse_bytes  # noqa: E402

SAMPLES = {
    "python": "def f(x):\r\n    s = '名前😀'\n    return x + 1\n",
    "javascript": "function f(x) {\n  const s = '值😀';\r\n  return x + 1;\n}\n",
    "rust": "fn f(x: i32) -> i32 {\n    let s = \"é😀\";\n    x + 1\n}\n",
    "go": "package m\n\nfunc f(x int) int {\n\ts := \"名\"\n\treturn x + 1\n}\n",
    "c": "int f(int x) {\n  char *s = \"😀\";\r\n  return x + 1;\n}\n",
}
EDIT_PIECES = ["x", " ", "(", ")", "{", "}", "\n", "\r\n", "é", "😀", "名", ";", "return ", "'", "\"", "#", "//"]


def assert_columns_are_bytes_in_line(tree, data: bytes) -> None:
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        for byte, point in ((node.start_byte, node.start_point), (node.end_byte, node.end_point)):
            assert point[0] == data.count(b"\n", 0, byte)
            assert point[1] == byte - (data.rfind(b"\n", 0, byte) + 1)
        stack.extend(node.children)


@pytest.mark.parametrize("language", sorted(SAMPLES))
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.lists(st.sampled_from(EDIT_PIECES), max_size=3)),
                      min_size=1, max_size=12))
def test_incremental_tree_equals_a_fresh_parse_after_store_edits(language, edits):
    """Edits go through the strict store (UTF-16 positions, CRLF, emoji), the tree through TreeCache: after
    every edit its s-expression equals a fresh parse's, and every Point column counts bytes in its line."""
    store = DocumentStore()
    doc = store.open(URI, language, 1, SAMPLES[language])
    cache = TreeCache()
    cache.parse("k", language, doc.text.encode(), None)
    for version, (a, b, pieces) in enumerate(edits, start=2):
        start, end = sorted((int(a * len(doc.text)), int(b * len(doc.text))))
        if doc.text[start - 1 : start + 1] == "\r\n":
            start -= 1
        if doc.text[end - 1 : end + 1] == "\r\n":
            end -= 1
        start_pos, end_pos = doc.position_at(start, UTF16), doc.position_at(end, UTF16)
        try:
            store.change(URI, version, [TextChange("".join(pieces), (start_pos, end_pos))], UTF16)
        except InvalidEdit:
            pytest.fail("a position made by the store itself was rejected")
        data = doc.text.encode()
        incremental = cache.parse("k", language, data, None)
        assert str(incremental.root_node) == str(parse_bytes(language, data).root_node)
        assert_columns_are_bytes_in_line(incremental, data)


def test_a_parse_that_times_out_mid_edit_leaves_no_half_edited_tree(monkeypatch):
    """The cached tree is edited in place before the parse; a deadline hit then must not leave that tree
    next to the old bytes (the next edit would be applied twice: the llm-ls new_end_position bug class)."""
    cache = TreeCache()
    first = b"def f(x):\n    return x\n"
    cache.parse("k", "python", first, None)
    real = syntax.parse_bytes

    def times_out(*args, **kwargs):
        raise ParseTimeout("simulated")

    monkeypatch.setattr(syntax, "parse_bytes", times_out)
    second = b"def f(x):\n    y = 1\n    return x\n"
    with pytest.raises(ParseTimeout):
        cache.parse("k", "python", second, 0.2)
    entry = cache._entries.get("k")
    assert entry is None or entry.tree.root_node.end_byte == len(entry.data), "a cached tree out of step with its bytes"
    monkeypatch.setattr(syntax, "parse_bytes", real)
    third = b"def f(x):\n    y = 1\n    return x + y\n"
    assert str(cache.parse("k", "python", third, None).root_node) == str(parse_bytes("python", third).root_node)


# ---- C7: a parse that hangs -------------------------------------------------------------------------------------------
from golden_runner import ScriptedEngine  # noqa: E402
from lsp_server.completion import CompletionService  # noqa: E402
from lsp_server.config import Settings  # noqa: E402
from lsp_server.context import Snapshot  # noqa: E402
from lsp_server.context.syntax import HANG_GRACE_S, too_big_to_parse  # noqa: E402


class LoopTicker:
    """Measures the event loop's longest stall while it runs."""

    def __init__(self) -> None:
        self.max_gap_s = 0.0
        self._task = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - last - 0.005)
            last = now

    def stop(self) -> float:
        self._task.cancel()
        return self.max_gap_s


def _service(output: str = "x + 1") -> tuple[CompletionService, ScriptedEngine]:
    engine = ScriptedEngine(output)
    service = CompletionService(engine, Settings())
    service.settings.cache.enabled = False
    return service, engine


async def test_a_hung_parse_falls_back_to_no_tree_and_the_parser_restarts(monkeypatch):
    """C7 with a seam: the grammar hangs without ever calling tree-sitter's progress callback (so the
    deadline inside the parse never fires). The request is answered without a tree within 300 ms of the
    parse deadline, the loop keeps running, later requests do not wait on the hung parser, and after the
    back-off a fresh parse thread gives trees again."""
    release = threading.Event()
    real = syntax.analyze

    def hangs(*args):
        release.wait(30)  # a stuck grammar (the GIL released, as a wait in C would)
        return real(*args)

    monkeypatch.setattr(syntax, "analyze", hangs)
    service, engine = _service()
    deadline_s = service.syntax.deadline_s
    text = "def f(a, b):\n    return \n"
    ticker = LoopTicker()
    try:
        t0 = time.monotonic()
        first = await service.complete(Snapshot(URI, 1, text, text.index("return ") + 7, "python"))
        late_s = time.monotonic() - t0 - deadline_s
        assert first.text == "x + 1"  # answered, in no-tree mode
        assert late_s <= 0.3 + 0.05, f"answered {late_s * 1000:.0f} ms after the parse deadline"
        assert service.syntax.hangs == 1
        t1 = time.monotonic()
        second = await service.complete(Snapshot(URI, 2, text + "\n", text.index("return ") + 7, "python"))
        assert second.text == "x + 1" and time.monotonic() - t1 < 0.1  # paused: nobody waits on the parser
    finally:
        release.set()
        gap_s = ticker.stop()
    assert gap_s < 0.05, f"the event loop stalled {gap_s * 1000:.0f} ms"
    monkeypatch.setattr(syntax, "analyze", real)
    service.syntax._paused_until = 0.0  # the back-off is over
    facts = await service.syntax.analyze(URI, "python", text, text.index("return ") + 7, False)
    assert facts is not None and facts.headers == ["def f(a, b):"]
    print(f"\nC7: answered {late_s * 1000:.0f} ms after the {deadline_s * 1000:.0f} ms deadline; loop stall max {gap_s * 1000:.1f} ms")


async def test_a_slow_parse_is_stopped_at_its_deadline_and_the_loop_keeps_running():
    """A real slow parse (a 2.4 MB Python list is over the size limit, so 1.8 MB here): the progress callback
    stops it at the deadline; no tree, and the loop keeps ticking meanwhile."""
    service, _ = _service()
    text = "x = [" + "1, " * 600_000 + "]\n"
    assert not too_big_to_parse(text)
    ticker = LoopTicker()
    t0 = time.monotonic()
    tree = await service.syntax.tree(URI, "python", text)
    elapsed_s = time.monotonic() - t0
    gap_s = ticker.stop()
    assert tree is None and elapsed_s < service.syntax.deadline_s + HANG_GRACE_S
    assert service.syntax.hangs == 0  # slow is not hung: no back-off
    assert gap_s < 0.1, f"the event loop stalled {gap_s * 1000:.0f} ms"
    print(f"\nC7 slow parse: no tree after {elapsed_s * 1000:.0f} ms; loop stall max {gap_s * 1000:.1f} ms")


# ---- C8: unknown, huge and binary documents -----------------------------------------------------------------------------
async def test_an_unknown_language_gets_plain_text_completions():
    service, engine = _service("done")
    text = "frobnicate the widgets\nthen \n"
    result = await service.complete(Snapshot("file:///p/notes.weird", 1, text, text.index("then ") + 5, "cobol-2087"))
    assert result.text == "done" and engine.requests


@pytest.mark.parametrize("text, binary", [
    ("x = 1\n\x00\x00\x00garbage\x00" * 50, True),  # NULs: a binary file opened as text
    ("x = 1\n" + "\ufffd" * 30 + "y = 2\n" * 400, True),  # 1 % U+FFFD: decoded with the wrong encoding
    ("x = 1\n" * 1000 + "\x00", False),  # one NUL in 6,000 characters: a text file with a stray NUL
])
def test_binary_looking_documents_get_no_ai_features(text, binary):
    doc = DocumentStore().open(URI, "python", 1, text)
    assert bool(doc.ai_off_reason()) == binary


def test_the_size_limits_that_turn_tree_sitter_off():
    assert too_big_to_parse("x" * 2_000_001)
    assert too_big_to_parse("名" * 700_000)  # 2.1 MB of UTF-8 in 700,000 characters
    assert too_big_to_parse("\n" * 50_000) and too_big_to_parse("\r\n" * 50_000) and not too_big_to_parse("\r\n" * 49_999)
    assert not too_big_to_parse("x = 1\n" * 40_000)


def _huge_text(mb: float) -> str:
    line = "    value = compute(alpha, beta) + 12345  # a comment, é 名 😀\r\n"
    return "def f():\r\n" + line * int(mb * 1e6 / len(line.encode()))


def test_did_change_on_a_10_mb_document_is_fast_and_small():
    """C8: 1-character edits through the didChange handler on a 10 MB document (p99 <= 5 ms asked; this
    shared CI machine gets a looser bound, scripts/bench_documents.py measures it on an idle one), and the
    memory it takes stays under 3 x the document + 100 MB."""
    import psutil
    from lsprotocol import types

    from lsp_server.handlers import documents as handlers

    ls = SimpleNamespace(store=DocumentStore(), position_encoding=UTF16, document_changed=lambda uri, lines: None)
    text = _huge_text(10)
    size_mb = len(text.encode()) / 1e6
    before = psutil.Process().memory_info().rss
    handlers.did_open(ls, types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(uri=URI, language_id="python", version=1, text=text)))
    del text
    doc = ls.store.get(URI)
    rng = random.Random(3)
    times = []
    for version in range(2, 502):
        line = rng.randrange(1, doc.line_count - 1)
        at = types.Position(line=line, character=4)
        params = types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(version=version, uri=URI),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text="x")],
        )
        t0 = time.perf_counter()
        handlers.did_change(ls, params)
        times.append((time.perf_counter() - t0) * 1000)
    assert doc.version == 501 and not doc.desynced and doc.text.count("x") == 500 + 500 * 0 + _huge_text(10).count("x")
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    grown_mb = (psutil.Process().memory_info().rss - before) / 1e6
    print(f"\nC8: didChange on {size_mb:.1f} MB: p50 {p50:.2f} ms, p99 {p99:.2f} ms; RSS +{grown_mb:.0f} MB")
    assert p50 <= 2.0 and p99 <= 50.0  # p99 here is the scheduler of a loaded 2-core machine
    assert grown_mb <= 3 * size_mb + 100


async def test_a_huge_document_gets_plain_text_completions_from_a_window():
    """C8: over 2 MB no tree-sitter; the completion still comes, its prompt holds <= 16 KB around the cursor."""
    service, engine = _service("result")
    text = _huge_text(3) + "\r\nvalue = \r\n" + _huge_text(0.5)
    offset = text.index("\r\nvalue = \r\n") + len("\r\nvalue = ")
    assert not service.syntax.usable("python", text)
    t0 = time.monotonic()
    result = await service.complete(Snapshot(URI, 1, text, offset, "python"))
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert result.text == "result"
    prompt = "".join(segment.text for segment in engine.requests[0].segments)
    assert len(prompt.encode()) <= 16 * 1024, len(prompt.encode())
    print(f"\nC8: completion on a {len(text.encode()) / 1e6:.1f} MB document in {elapsed_ms:.0f} ms, prompt {len(prompt.encode())} bytes")


# ---- C1 end to end: the real server in each negotiated encoding --------------------------------------------------
@pytest.mark.parametrize("encoding", [UTF8, UTF16])
async def test_the_server_keeps_the_clients_text_in_the_negotiated_encoding(encoding, tmp_path):
    """C1/C2/C3 over stdio: random edits expressed in the negotiated encoding, then a completion whose prompt
    (recorded by the scripted worker) holds exactly the client's text; a rejected edit turns AI features off
    for the document until a full-text change. (The server never chooses UTF-32: it prefers UTF-8, else
    UTF-16; the store's UTF-32 path is covered by the state machine.)"""
    record = tmp_path / "requests.jsonl"
    client = await RawClient.start("--fake-engine", json.dumps({"outputs": ["done"], "record_path": str(record)}))
    try:
        reply = await client.initialize({"general": {"positionEncodings": [encoding]}, "textDocument": {"inlineCompletion": {}}})
        assert reply["result"]["capabilities"].get("positionEncoding", UTF16) == encoding
        await client.wait_ready()
        text = "# a😀b 名前 e\u0301 👨\u200d👩\u200d👧\r\nx = 1\rnote = 'é\u2028\x85\f'\n"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1, "text": text}})
        rng = random.Random(11)
        version = 1
        for _ in range(40):
            a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            while text[a - 1 : a + 1] == "\r\n" or text[b - 1 : b + 1] == "\r\n" or (0 < a < len(text) and "\udc00" <= text[a] <= "\udfff"):
                a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            new = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
            (sl, sc), (el, ec) = ref_position(text, a, encoding), ref_position(text, b, encoding)
            version += 1
            client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version}, "contentChanges": [
                {"range": {"start": {"line": sl, "character": sc}, "end": {"line": el, "character": ec}}, "text": new}]})
            text = ref_apply(text, [TextChange(new, ((sl, sc), (el, ec)))], encoding)
        text_end = text + "\nresult = "
        version += 1
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version}, "contentChanges": [{"text": text_end}]})
        line, character = ref_position(text_end, len(text_end), encoding)
        reply = await client.request("textDocument/inlineCompletion", inline_params(URI, line, character))
        items = reply["result"]["items"]
        assert [i["insertText"] for i in items] == ["done"]
        assert items[0]["range"]["start"] == {"line": line, "character": character}
        prompt = "".join(s["text"] for s in json.loads(record.read_text().splitlines()[-1])["segments"])
        def visible(t: str) -> str:  # the prompt goes without zero-width characters (redact.py, F13)
            return re.sub("[\u200b-\u200f\u2060\ufeff]", "", t)

        assert visible(text_end)[-60:] in visible(prompt)  # the server's text is the client's
        # A reversed range: rejected whole, the document is desynced and gets no completions ...
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version + 1}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": 3}, "end": {"line": 0, "character": 1}}, "text": "X"}]})
        reply = await client.request("textDocument/inlineCompletion", inline_params(URI, line, character))
        assert reply["result"]["items"] == []
        # ... until the client sends the whole text again.
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version + 2}, "contentChanges": [{"text": text_end}]})
        reply = await client.request("textDocument/inlineCompletion", inline_params(URI, line, character))
        assert [i["insertText"] for i in reply["result"]["items"]] == ["done"]
    finally:
        await client.close()
