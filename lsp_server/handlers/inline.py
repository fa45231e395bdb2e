"""textDocument/inlineCompletion and the textDocument/completion fallback."""

from __future__ import annotations

import asyncio

from lsprotocol import types

from ..context import Snapshot


def _snapshot(ls, uri: str, position: types.Position) -> Snapshot | None:
    doc = ls.store.get(uri)
    if doc is None or doc.ai_off_reason():  # desynced or binary: nothing to suggest
        return None
    offset = doc.offset_at(position.line, position.character, ls.position_encoding)
    return Snapshot(uri, doc.version, doc.text, offset, doc.language_id)


def _still_current(ls, snap: Snapshot) -> bool:
    doc = ls.store.get(snap.uri)
    return doc is not None and doc.version == snap.version and not doc.desynced


async def inline_completion(ls, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    # A $/cancelRequest sent in the same write as this request is handed to the loop as a separate callback by
    # the stdin reader thread: waiting 1 ms (the loop releases the GIL) lets it arrive and cancel this task
    # before anything runs (A3). Measured: with sleep(0) the service was still entered in 2 of 50 cases, with
    # 1 ms in 0 of 200.
    await asyncio.sleep(0.001)
    snap = _snapshot(ls, params.text_document.uri, params.position)
    if snap is None:
        return types.InlineCompletionList(items=[])
    completion = await ls.completions.complete(snap)
    if not completion.text or not _still_current(ls, snap):
        return types.InlineCompletionList(items=[])
    position = types.Position(params.position.line, params.position.character)
    return types.InlineCompletionList(
        items=[types.InlineCompletionItem(insert_text=completion.text, range=types.Range(position, position))]
    )


async def completion(ls, params: types.CompletionParams) -> types.CompletionList:
    """For clients without inline completion: the suggestion as one completion item."""
    empty = types.CompletionList(is_incomplete=True, items=[])
    if ls.client_has_inline_completion():
        return empty  # the inline request already runs the model; don't run it twice per keystroke
    snap = _snapshot(ls, params.text_document.uri, params.position)
    if snap is None:
        return empty
    result = await ls.completions.complete(snap)
    if not result.text or not _still_current(ls, snap):
        return empty
    position = types.Position(params.position.line, params.position.character)
    first_line = result.text.strip().splitlines()[0] if result.text.strip() else result.text
    item = types.CompletionItem(
        label=first_line[:80],
        kind=types.CompletionItemKind.Snippet,
        detail="offpilot",
        text_edit=types.TextEdit(types.Range(position, position), result.text),
        insert_text_format=types.InsertTextFormat.PlainText,
        sort_text="~",
    )
    return types.CompletionList(is_incomplete=True, items=[item])
