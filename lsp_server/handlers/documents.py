"""Document sync into the strict store. Synchronous on purpose: each edit is applied before the next
message is read, so a completion request always sees the text the client had when it asked."""

from __future__ import annotations

from lsprotocol import types

from ..documents import InvalidEdit, TextChange


def did_open(ls, params: types.DidOpenTextDocumentParams) -> None:
    doc = params.text_document
    ls.store.open(doc.uri, doc.language_id, doc.version, doc.text)


def did_change(ls, params: types.DidChangeTextDocumentParams) -> None:
    changes = []
    for change in params.content_changes:
        if isinstance(change, types.TextDocumentContentChangePartial):
            r = change.range
            changes.append(TextChange(change.text, ((r.start.line, r.start.character), (r.end.line, r.end.character)), change.range_length))
        else:
            changes.append(TextChange(change.text))
    try:
        ls.store.change(params.text_document.uri, params.text_document.version, changes, ls.position_encoding)
    except InvalidEdit:
        return  # logged once by the store; the document stays desynced until a full sync
    ls.document_changed(params.text_document.uri, [c.range[0][0] for c in changes if c.range is not None])


def did_close(ls, params: types.DidCloseTextDocumentParams) -> None:
    ls.document_closed(params.text_document.uri)
