"""Edit safety (reliability.md D1-D6): results pinned to the version they were computed for, edits confined to
what was asked, model output sanitized, and accepting a suggestion giving exactly the golden file in every
position encoding.

Most tests drive the real handlers in process (a stand-in for the pygls server object, the real store,
completion and action services, a scripted model), so hundreds of model outputs run in seconds; a few go
through the whole server over stdio.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from lsprotocol.converters import get_converter

from golden_runner import CURSOR, GOLDEN_DIR, ScriptedEngine, load
from lsp_raw import RawClient, inline_params
from lsp_server import postprocess
from lsp_server.actions import ActionService
from lsp_server.completion import CompletionService
from lsp_server.config import Settings
from lsp_server.context import Snapshot, build_context
from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, TextChange
from lsp_server.handlers import actions as action_handlers
from lsp_server.handlers import documents as document_handlers
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
