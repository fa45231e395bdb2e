"""Edit safety (reliability.md D1-D6): results pinned to the version they were computed for, edits confined to
what was asked, model output sanitized, and accepting a suggestion giving exactly the golden file in every
position encoding.

Most tests drive the real handlers in process (a stand-in for the pygls server object, the real store,
completion and action services, a scripted model), so hundreds of model outputs run in seconds; a few go
through the whole server over stdio.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from lsprotocol.converters import get_converter

from golden_runner import ScriptedEngine
from lsp_server import postprocess
from lsp_server.actions import ActionService
from lsp_server.completion import CompletionService
from lsp_server.config import Settings
from lsp_server.context import Snapshot, build_context
from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, TextChange
from lsp_server.handlers import actions as action_handlers
from lsp_server.handlers import inline as inline_handlers

CONVERTER = get_converter()
URI = "file:///project/shapes.py"
DOC = '''import math


def area(w, h):
    return w * h


def circle(r):
    return math.pi * r * r
'''


class Engine(ScriptedEngine):
    """The golden runner's scripted engine, with a hook that runs while the model 'works'."""

    def __init__(self, outputs: list[str], during=None) -> None:
        super().__init__(outputs[0])
        self.backend.outputs = list(outputs)
        self.backend.action_outputs = list(outputs)
        self.during = during

    def submit(self, request):
        if self.during is not None:
            self.during()
        return super().submit(request)


def make_ls(outputs: list[str], *, encoding: str = UTF16, resolve_edits: bool = True, during=None, caps: dict | None = None):
    """What the handlers use of the server, with the real store and services."""
    settings_ = Settings()
    engine = Engine(outputs, during)
    capabilities = caps if caps is not None else {
        "textDocument": {"codeAction": {"resolveSupport": {"properties": ["edit"]} if resolve_edits else None}, "inlineCompletion": {}},
        "workspace": {"workspaceEdit": {"documentChanges": True, "changeAnnotationSupport": {}}},
    }
    ls = SimpleNamespace(
        settings=settings_, store=DocumentStore(), position_encoding=encoding, action_tasks={}, messages=[],
        completions=CompletionService(engine, settings_),
        actions=ActionService(engine, settings_, family_of=lambda: "qwen2.5-coder"),
        protocol=SimpleNamespace(client_capabilities=CONVERTER.structure(capabilities, types.ClientCapabilities)),
        engine=engine,
    )
    ls.completions.settings.cache.enabled = False
    ls.window_show_message = lambda params: ls.messages.append(params.message)
    ls.client_has_inline_completion = lambda: True
    ls.document_changed = lambda uri, lines: None
    return ls


def open_doc(ls, text: str = DOC, uri: str = URI, version: int = 1, language: str = "python"):
    return ls.store.open(uri, language, version, text)


def point(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


def action_params(line: int, character: int, end: tuple[int, int] | None = None, uri: str = URI) -> types.CodeActionParams:
    return types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=point(line, character), end=point(*(end or (line, character)))),
        context=types.CodeActionContext(diagnostics=[]),
    )


async def refactor_action(ls, line=4, character=8, end=None) -> types.CodeAction:
    listed = await action_handlers.code_action(ls, action_params(line, character, end))
    return next(a for a in listed if a.kind == types.CodeActionKind.RefactorRewrite)


def apply_text_edits(text: str, edits: list[tuple[tuple[int, int], tuple[int, int], str]], encoding: str) -> str:
    """The client's side: apply LSP edits (positions in `encoding`) to a text, last first."""
    doc = DocumentStore().open("file:///tmp", "", 1, text)
    spans = sorted(((doc.offset_at(*s, encoding, strict=True), doc.offset_at(*e, encoding, strict=True), t) for s, e, t in edits), reverse=True)
    for start, end, new in spans:
        text = text[:start] + new + text[end:]
    return text


def edits_of(ls, edit: types.WorkspaceEdit, uri: str = URI) -> tuple[int | None, list]:
    """(version, [(start, end, newText)]) of a WorkspaceEdit that must touch `uri` only and hold no file operations."""
    if edit.document_changes is not None:
        assert len(edit.document_changes) == 1
        change = edit.document_changes[0]
        assert isinstance(change, types.TextDocumentEdit), f"a file operation: {change!r}"
        assert change.text_document.uri == uri
        raw, version = change.edits, change.text_document.version
    else:
        assert list(edit.changes) == [uri]
        raw, version = edit.changes[uri], None
    return version, [((e.range.start.line, e.range.start.character), (e.range.end.line, e.range.end.character), e.new_text) for e in raw]


# ---- D1: version-pinned results ------------------------------------------------------------------------------------
REFACTORED = "```python\ndef area(width, height):\n    return width * height\n```"


async def test_a_resolved_refactor_carries_the_version_it_was_computed_for():
    ls = make_ls([REFACTORED])
    open_doc(ls, version=7)
    action = await refactor_action(ls)
    assert action.data["version"] == 7
    resolved = await action_handlers.resolve(ls, action)
    version, edits = edits_of(ls, resolved.edit)
    assert version == 7 and len(edits) == 1


async def test_an_edit_landing_while_the_action_finds_its_target_sends_no_edit():
    """The document object is updated in place by didChange: a change that lands while the action awaits its
    parse must not mix the old target with the new text (or send the new version with the old range)."""
    ls = make_ls([REFACTORED])
    doc = open_doc(ls)
    action = await refactor_action(ls)
    real_tree = ls.completions.syntax.tree

    async def tree_then_typing(key, language, text):
        tree = await real_tree(key, language, text)
        ls.store.change(URI, doc.version + 1, [TextChange("# typed\n", ((0, 0), (0, 0)))], UTF16)
        return tree

    ls.completions.syntax.tree = tree_then_typing
    resolved = await action_handlers.resolve(ls, action)
    assert resolved.edit is None
    assert any("changed" in m for m in ls.messages)


async def test_typing_while_the_model_works_sends_no_edit_and_no_stale_inline_item():
    ls = make_ls([REFACTORED])
    doc = open_doc(ls)

    def typing():
        ls.store.change(URI, doc.version + 1, [TextChange("#", ((8, 0), (8, 0)))], UTF16)

    ls.engine.during = typing
    action = await refactor_action(ls)
    assert (await action_handlers.resolve(ls, action)).edit is None
    # The inline answer computed for the old version is not sent either.
    ls.engine.backend.outputs = [" + 1"]
    params = types.InlineCompletionParams(text_document=types.TextDocumentIdentifier(uri=URI), position=point(4, 16),
                                          context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))
    assert (await inline_handlers.inline_completion(ls, params)).items == []
    ls.engine.during = None
    items = (await inline_handlers.inline_completion(ls, params)).items
    assert items and items[0].range.start == point(4, 16)  # the same request, nothing typed meanwhile: sent


# ---- C5 (read-only leniency) for actions: a listed range that ends past its line resolves ----------------------------
async def test_an_action_listed_for_a_range_past_the_line_end_resolves():
    ls = make_ls([REFACTORED])
    open_doc(ls)
    action = await refactor_action(ls, 3, 0, end=(4, 9999))  # a selection Neovim ends inside a character / past the line
    resolved = await action_handlers.resolve(ls, action)
    assert resolved.edit is not None, ls.messages
    version, edits = edits_of(ls, resolved.edit)
    assert edits[0][0] == (3, 0)


# ---- D2 / D4: garbage and hostile model outputs -------------------------------------------------------------------
SPECIAL = ["<|fim_middle|>", "<|fim_prefix|>", "<|endoftext|>", "<|im_end|>", "<|file_sep|>", "<|repo_name|>", "<fim_suffix>",
           "<fim_middle>", "<file_sep>", "<repo_name>", "<｜fim▁hole｜>", "<｜end▁of▁sentence｜>", "<EOT>", " <MID>", "▁<SUF>",
           "[SUFFIX]", "[PREFIX]", "</s>", "<|file_separator|>"]
BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]
HIDDEN = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\U000e0041", "\U000e007f"]
CODE = ["x", "return ", "w * h", "(", ")", ":", "def g(a):", "    ", "\t", "pass", "名前", "😀", "'s'", "# c", "}", "{"]
LINE_ENDS = ["\n", "\n", "\r\n", "\r"]
garbage = st.lists(
    st.one_of(st.sampled_from(CODE), st.sampled_from(LINE_ENDS), st.sampled_from(SPECIAL), st.sampled_from(BIDI),
              st.sampled_from(HIDDEN), st.just("y = 1\n" * 300), st.just("z" * 9000), st.just("```python\n"), st.just("```\n")),
    max_size=25,
).map("".join)


def assert_sanitized(text: str, context: str, eol: str) -> None:
    for token in SPECIAL:
        assert token.strip() not in text, f"special token {token!r} in {text!r}"
    assert not any(ch in text for ch in BIDI), f"bidi control in {text!r}"
    for ch in HIDDEN:
        assert ch not in text or ch in context, f"hidden {ch!r} inserted where the context has none"
    bare = text.replace(eol, "")
    assert "\n" not in bare and "\r" not in bare, f"line ends other than {eol!r} in {text!r}"


DOCS = {
    "lf": "def area(w, h):\n    return w * h\n\n\ndef f(x):\n    y = x\n    \n",
    "crlf": "def area(w, h):\r\n    return w * h\r\n\r\n\r\ndef f(x):\r\n    y = x\r\n    \r\n",
    "cr": "def area(w, h):\r    return w * h\r\r\rdef f(x):\r    y = x\r    \r",
    "hidden": "def area(w, h):\n    s = 'a\u200bb\U000e0041'\n    return w * h\n\n\ndef f(x):\n    y = x\n    \n",
}


@pytest.mark.parametrize("kind", sorted(DOCS))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(output=garbage, encoding=st.sampled_from([UTF8, UTF16, UTF32]), where=st.sampled_from(["block", "line"]))
def test_inline_items_are_sanitized_and_confined_to_the_cursor(kind, output, encoding, where):
    """D2 + D4 for inline items, through the inline handler: the item inserts at the cursor (an empty range
    there), and its text has no special tokens, no bidi controls, no hidden characters the context lacks,
    the document's line ends, at most 8 KB and 200 lines."""
    text = DOCS[kind]
    eol = "\r\n" if kind == "crlf" else "\r" if kind == "cr" else "\n"
    lines = re.split(r"\r\n|\r|\n", text)
    line = len(lines) - 2 if where == "block" else 5
    column = len(lines[line])  # the end of the line: `    ` (a block) or `    y = x` (a line)
    ls = make_ls([output], encoding=encoding)
    doc = open_doc(ls, text)
    character = doc.position_at(doc.offset_at(line, column, UTF32), encoding)[1]
    params = types.InlineCompletionParams(text_document=types.TextDocumentIdentifier(uri=URI), position=point(line, character),
                                          context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))
    items = asyncio.run(inline_handlers.inline_completion(ls, params)).items
    assert len(items) <= 1
    for item in items:
        assert item.range == types.Range(start=point(line, character), end=point(line, character))
        assert item.command is None
        assert_sanitized(item.insert_text, text, eol)
        assert len(item.insert_text.encode("utf-8")) <= postprocess.MAX_SUGGESTION_BYTES
        assert len(re.split(r"\r\n|\r|\n", item.insert_text)) <= postprocess.MAX_SUGGESTION_LINES
        after = apply_text_edits(text, [((line, character), (line, character), item.insert_text)], encoding)
        cut = doc.offset_at(line, character, encoding)
        assert after[:cut] == text[:cut] and after.endswith(text[cut:])


@pytest.mark.parametrize("resolve_edits", [True, False], ids=["resolve", "command"])
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(body=garbage, fenced=st.booleans(), kind=st.sampled_from(["lf", "crlf", "hidden"]))
def test_refactor_edits_stay_inside_the_target(resolve_edits, body, fenced, kind):
    """D2 for refactors: one TextDocumentEdit of the request's document at the version asked about, no file
    operations, a range inside the function around the cursor, text outside it untouched; D4 on the new text."""
    text = DOCS[kind]
    eol = "\r\n" if kind == "crlf" else "\n"
    output = f"Here:\n```python\ndef area(w, h):\n{body}\n```\n" if fenced else body
    ls = make_ls([output], resolve_edits=resolve_edits)
    open_doc(ls, text, version=3)

    async def run():
        listed = await action_handlers.code_action(ls, action_params(1, 6))
        action = next(a for a in listed if a.kind == types.CodeActionKind.RefactorRewrite)
        if resolve_edits:
            assert action.command is None and action.edit is None
            return (await action_handlers.resolve(ls, action)).edit
        assert action.command.command == "offpilot.applyAction" and action.command.arguments == [action.data]
        sent = []

        async def apply_edit(params):
            sent.append(params.edit)
            return types.ApplyWorkspaceEditResult(applied=True)

        ls.workspace_apply_edit_async = apply_edit
        reply = await action_handlers.apply_action(ls, *action.command.arguments)
        assert reply["applied"] == bool(sent)
        return sent[0] if sent else None

    edit = asyncio.run(run())
    if edit is None:
        return  # nothing usable in the answer: no edit at all is a safe outcome
    version, edits = edits_of(ls, edit)
    assert version == 3 and len(edits) == 1
    (start, end, new_text), = edits
    function_end = text.index("return w * h") + len("return w * h")
    assert start == (0, 0) and end == DocumentStore().open("file:///t", "", 1, text).position_at(function_end, UTF16)
    assert_sanitized(new_text, text[:function_end], eol)
    after = apply_text_edits(text, edits, UTF16)
    assert after.endswith(text[function_end:])  # nothing after the function changed


@settings(max_examples=300, deadline=None, derandomize=True)
@given(output=garbage, context=st.sampled_from(list(DOCS.values())))
def test_clean_never_lets_through_what_d4_forbids(output, context):
    snap = Snapshot(URI, 1, context, len(context), "python")
    ctx = build_context(snap, Settings().completion)
    text = postprocess.clean(output, ctx, context)
    assert_sanitized(text, context, ctx.eol)
    assert len(text.encode("utf-8")) <= postprocess.MAX_SUGGESTION_BYTES
    assert len(re.split(r"\r\n|\r|\n", text)) <= postprocess.MAX_SUGGESTION_LINES


def test_a_refactor_keeps_the_zero_width_characters_its_code_had():
    """Stripping every zero-width character from a rewrite would silently change a string literal that holds one."""
    code = "def area(w, h):\n    s = 'a\u200bb'\n    return w * h\n"
    answer = "```python\ndef area(width, height):\n    s = 'a\u200bb\u202e'\n    return width * height\n```"
    ls = make_ls([answer])
    open_doc(ls, code)
    resolved = asyncio.run(_resolve_first_refactor(ls, 1, 6))
    new_text = edits_of(ls, resolved.edit)[1][0][2]
    assert "'a\u200bb'" in new_text and "\u202e" not in new_text


async def _resolve_first_refactor(ls, line, character):
    listed = await action_handlers.code_action(ls, action_params(line, character))
    action = next(a for a in listed if a.kind == types.CodeActionKind.RefactorRewrite)
    return await action_handlers.resolve(ls, action)


# ---- D1 end to end: typing while the model generates ------------------------------------------------------------------
async def test_no_inline_item_is_sent_for_a_version_that_went_stale_while_the_model_worked():
    """The whole server, a scripted model at 20 ms per token: a didChange that lands mid-generation makes the
    answer empty (the item would be placed by positions of the old text); the same request with no typing
    gets its item. 10 rounds each."""
    import json

    from lsp_raw import RawClient, inline_params

    client = await RawClient.start("--fake-engine", json.dumps({"outputs": ["total + 1 if total else 0"], "token_delay_ms": 20}))
    try:
        # No cache: each answer must come from a generation the typing can overtake.
        await client.initialize({"general": {"positionEncodings": ["utf-16"]}, "textDocument": {"inlineCompletion": {}}},
                                {"cache": {"enabled": False}})
        await client.wait_ready()
        text = "def f(total):\n    return \n"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1, "text": text}})
        version, stale_items, fresh_items = 1, 0, 0
        for _ in range(10):
            request = client.request_nowait("textDocument/inlineCompletion", inline_params(URI, 1, 11))
            await asyncio.sleep(0.05)  # the model is generating
            version += 1
            client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": version}, "contentChanges": [
                {"range": {"start": {"line": 2, "character": 0}, "end": {"line": 2, "character": 0}}, "text": "#"}]})
            stale_items += len((await client.wait_response(request, 10))["result"]["items"])
            fresh_items += len((await client.request("textDocument/inlineCompletion", inline_params(URI, 1, 11)))["result"]["items"])
        assert stale_items == 0
        assert fresh_items == 10
    finally:
        await client.close()


# ---- D5: an action applied while the user types ----------------------------------------------------------------------
def test_an_action_racing_typing_ends_in_one_of_the_linearizations():
    """1,000 runs: the user types one character at a random moment (before the listing, while the model
    works, after the edit is computed but before the client applies it, or after). The client applies a
    versioned edit only at that version (as VS Code does). The final text is always "action, then typing" or
    "typing, action refused": never the action's text placed by positions of a text it was not computed for."""
    import random

    rng = random.Random(9)
    outcomes = {"action then typing": 0, "typing, action refused": 0}
    ls = make_ls([REFACTORED])
    for run in range(1000):
        ls.store, ls.engine.during = DocumentStore(), None
        client_text = DOC
        doc = open_doc(ls, client_text)
        moment = rng.choice(["before listing", "while the model works", "before applying", "after applying"])
        where = rng.choice([(0, 0), (6, 0), (8, 5)])  # above, below the function; in the next one

        def type_one():
            nonlocal client_text
            client_text = apply_text_edits(client_text, [(where, where, "#")], UTF16)
            ls.store.change(URI, doc.version + 1, [TextChange("#", (where, where))], UTF16)

        async def race():
            nonlocal client_text
            if moment == "before listing":
                type_one()
            if moment == "while the model works":
                ls.engine.during = type_one
            action = await refactor_action(ls)
            resolved = await action_handlers.resolve(ls, action)
            if moment == "before applying":
                type_one()
            if resolved.edit is not None:
                version, edits = edits_of(ls, resolved.edit)
                if version == doc.version:  # the client's check
                    client_text = apply_text_edits(client_text, edits, UTF16)
                    ls.store.change(URI, doc.version + 1, [TextChange(e[2], (e[0], e[1])) for e in edits], UTF16)
            if moment == "after applying":
                type_one()

        asyncio.run(race())
        typed_only = apply_text_edits(DOC, [(where, where, "#")], UTF16)
        refactored = DOC.replace("def area(w, h):\n    return w * h", "def area(width, height):\n    return width * height")
        action_then_typing = {apply_text_edits(refactored, [(where, where, "#")], UTF16)}  # same line count
        assert client_text == ls.store.get(URI).text
        if client_text == typed_only:
            outcomes["typing, action refused"] += 1
        else:
            assert client_text in action_then_typing, (moment, where, client_text)
            outcomes["action then typing"] += 1
    assert all(outcomes.values()), outcomes
    print(f"\nD5: 1000 runs: {outcomes}")


async def test_a_desynced_document_gets_no_code_actions_until_a_full_sync():
    ls = make_ls([REFACTORED])
    open_doc(ls)
    with pytest.raises(Exception):
        ls.store.change(URI, 2, [TextChange("X", ((4, 8), (4, 2)))], UTF16)
    assert await action_handlers.code_action(ls, action_params(4, 8)) is None
    ls.store.change(URI, 3, [TextChange(DOC)], UTF16)
    assert await action_handlers.code_action(ls, action_params(4, 8))


# ---- D3: an offered refactor never makes the syntax worse -------------------------------------------------------------
def _corpus():
    from golden_runner import all_cases, load

    from lsp_server.languages import detect

    for path in all_cases():
        case = load(path)
        info = detect("", f"file:///{case.file_name}")
        if info is not None:
            yield pytest.param(case, info.name, id=f"{path.parent.name}/{path.stem}")


def _broken(code: str) -> str:
    """The model's rewrite with its last closing bracket or colon dropped (a typical truncated answer)."""
    for ch in ("}", ")", ":"):
        i = code.rfind(ch)
        if i >= 0:
            return code[:i] + code[i + 1 :]
    return code + " ("


@pytest.mark.parametrize("case, language", list(_corpus()))
def test_a_refactor_that_breaks_the_syntax_is_never_offered(case, language):
    """D3 on the golden corpus (every language): the scripted model answers with the target's code minus
    a closing bracket or colon, twice (the retry too): whatever is offered parses no worse than before."""
    from lsp_server.actions import ActionError, ActionService, find_target, parse_errors
    from lsp_server import languages

    document = case.document
    tree = languages.parse(language, document)
    target = find_target(document, language, case.offset, case.offset, tree) or find_target(
        document, language, 0, len(document), None)
    broken = "```\n" + _broken(target.text) + "\n```"
    service = ActionService(Engine([broken]), Settings(), family_of=lambda: "qwen2.5-coder")
    before = parse_errors(language, document)
    try:
        outcome = asyncio.run(service.run("refactor", document, language, case.file_name, target))
    except ActionError:
        outcome = None
    if outcome is not None:  # offered: it must parse no worse than before
        after = document[: target.start] + outcome.new_text + document[target.end :]
        assert parse_errors(language, after) <= before, outcome.new_text
