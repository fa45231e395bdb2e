"""pygls's LSP protocol with the gaps closed that would leave an editor waiting or a document wrong.

- A request whose params fail validation gets a -32602 reply (pygls only logs it, so the client waits
  forever).
- positionEncoding: UTF-8 when the client offers it (tree-sitter works in bytes), else UTF-16.
- Document sync goes only to our strict store (pygls's own copy duplicates text on reversed ranges and
  costs O(document) per keystroke).
"""

from __future__ import annotations

import logging
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInternalError, JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.protocol import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)


class _BadRequest:
    """A request that could not be structured: answered with an error instead of dispatched."""

    jsonrpc = "2.0"

    def __init__(self, msg_id: Any, method: str, error) -> None:
        self.id = msg_id
        self.method = method
        self.error = error


class OffpilotProtocol(LanguageServerProtocol):
    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except (JsonRpcInvalidParams, JsonRpcInternalError) as exc:
            if isinstance(data, dict) and "method" in data and "id" in data:
                msg_id = data["id"]
                if not isinstance(msg_id, (int, str)) or isinstance(msg_id, bool):
                    return _BadRequest(None, str(data.get("method")), JsonRpcInvalidRequest("invalid request id"))
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}")
                return _BadRequest(msg_id, str(data["method"]), error)
            raise

    def handle_message(self, message):
        if isinstance(message, _BadRequest):
            log.warning("answered %s request %r with %s", message.method, message.id, type(message.error).__name__)
            self._send_response(message.id, None, message.error.to_response_error())
            return None
        return super().handle_message(message)

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        general = params.capabilities.general
        offered = list(general.position_encodings or []) if general else []
        chosen = types.PositionEncodingKind.Utf8 if types.PositionEncodingKind.Utf8 in offered else types.PositionEncodingKind.Utf16
        if general is not None:
            general.position_encodings = [chosen]
        return (yield from super().lsp_initialize(params))

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None
