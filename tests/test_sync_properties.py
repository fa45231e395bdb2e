"""Document sync, positions and parsing (reliability.md C1-C8): the strict store against an independent
reference, tree-sitter's incremental trees against fresh parses, parse deadlines and hangs, and documents
that are huge, binary or in no known language.

The long runs live in scripts/fuzz_documents.py (same machine, more sessions).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsp_raw import RawClient, inline_params
from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, InvalidEdit, TextChange
from sync_machine import (
    MACHINE_SETTINGS, PIECES, URI, SyncChunkedUtf8, SyncChunkedUtf16, SyncUtf8, SyncUtf16, SyncUtf32, ref_apply,
    ref_position, ref_split, text_st,
)

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
@pytest.mark.parametrize("encoding", [UTF8, UTF16, UTF32])
async def test_the_server_keeps_the_clients_text_in_the_negotiated_encoding(encoding, tmp_path):
    """C1/C2/C3 over stdio: random edits expressed in the negotiated encoding, then a completion whose prompt
    (recorded by the scripted worker) holds exactly the client's text; a rejected edit turns AI features off
    for the document until a full-text change."""
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
