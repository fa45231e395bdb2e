"""pygls's LSP protocol with the gaps closed that would leave an editor waiting or a document wrong.

Every message from the client enters through `feed(body)`, which never raises:

- malformed JSON → -32700 to the request's id when one can be read at the top level, else one
  (rate-limited) log line; an id of the wrong type → -32600 with a null id;
- params that fail validation (a missing field, `line: -1`, a string where a number goes: the converter is
  strict about JSON types, pygls's coerces `"3"` to 3 and `1.5` to 1) → -32602 with the request's id
  (pygls only logs them, so the client waits forever); an unknown method → -32601;
- lifecycle: a request before `initialize` → -32002, a second `initialize` or any request after
  `shutdown` → -32600 (pygls answers nothing after shutdown); notifications then are dropped, except
  `exit`, which ends the process (code 0 after `shutdown`, else 1);
- `$/cancelRequest` for an unknown or finished id is a DEBUG line, never a reply or a popup;
- a response is sent at most once per request id, and never to an id the client did not send.
- positionEncoding: UTF-8 when the client offers it (tree-sitter works in bytes), else UTF-16.
- Document sync goes only to our strict store (pygls's own copy duplicates text on reversed ranges and
  costs O(document) per keystroke).
"""

from __future__ import annotations

import enum
import json
import logging
import time
from typing import Any, Callable, Union

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInternalError,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)


class Throttle:
    """At most `burst` log lines, then one per `period_s` carrying the count of those left out: a storm of
    bad input costs a few lines, not one per message."""

    def __init__(self, logger: logging.Logger, burst: int = 3, period_s: float = 10.0) -> None:
        self.logger, self.burst, self.period_s = logger, burst, period_s
        self.count = 0
        self._suppressed = 0
        self._last = 0.0

    def __call__(self, level: int, fmt: str, *args, exc_info: bool = False) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.burst or now - self._last >= self.period_s:
            if self._suppressed:
                fmt += f" ({self._suppressed} more like this not logged)"
            self._suppressed = 0
            self._last = now
            self.logger.log(level, fmt, *args, exc_info=exc_info)
        else:
            self._suppressed += 1


def _strict(kind: type | tuple[type, ...], name: str) -> Callable[[Any, type], Any]:
    def structure(value: Any, _type: type) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, kind):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        if isinstance(_type, type) and issubclass(_type, enum.Enum):
            return _type(value)  # the hook is found for int and str enums too: check the value there
        return value
    return structure


def _valid_id(msg_id: Any) -> bool:
    return isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool)


def _strict_id(value: Any, _type: Any) -> int | str:
    if not _valid_id(value):
        raise TypeError(f"expected an integer or a string, got {type(value).__name__}")
    return value


def _is_notification_method(method: str) -> bool:
    kind = types.METHOD_TO_TYPES.get(method)
    return bool(kind) and kind[0].__name__.endswith("Notification")


def top_level_id(body: bytes) -> int | str | None:
    """The `"id"` member of a body that is not valid JSON, if it can be read at the top level of its
    object (a nested `"id"`, e.g. a cancel's params, is never taken for the message's own)."""
    text = body.decode("utf-8", "replace")
    depth = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            key = text[i + 1:j]
            i = j + 1
            if depth == 1 and key == "id":
                k = i
                while k < n and text[k] in " \t\r\n":
                    k += 1
                if k < n and text[k] == ":":
                    rest = text[k + 1:k + 200].lstrip()
                    try:
                        value, _ = json.JSONDecoder().raw_decode(rest)
                    except ValueError:
                        return None
                    return value if _valid_id(value) else None
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        i += 1
    return None


class _BadRequest:
    """A request that could not be structured: answered with an error instead of dispatched."""

    jsonrpc = "2.0"

    def __init__(self, msg_id: Any, method: str, error) -> None:
        self.id = msg_id
        self.method = method
        self.error = error


class OffpilotProtocol(LanguageServerProtocol):
    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        # pygls keeps the future of every notification handled by a coroutine or a generator (didOpen/didChange/
        # didClose here) in _request_futures under a fresh uuid, and only requests' entries are ever removed: a
        # Future with its Condition per keystroke (soak: 1,003 entries after 1,001 didChange; RSS +28 MB over
        # 10,000 edits). Drop each entry when its handler is done.
        super()._execute_handler(msg_id, handler, callback, args, kwargs)
        future = self._request_futures.get(msg_id)
        if future is not None:
            def forget(done, msg_id=msg_id) -> None:
                if self._request_futures.get(msg_id) is done:
                    del self._request_futures[msg_id]

            future.add_done_callback(forget)

    def __init__(self, server, converter) -> None:
        # JSON types are checked, not coerced: a string line or a float character is invalid params.
        converter.register_structure_hook(int, _strict(int, "an integer"))
        converter.register_structure_hook(float, _strict((int, float), "a number"))
        converter.register_structure_hook(str, _strict(str, "a string"))
        converter.register_structure_hook(bool, _strict(bool, "a boolean"))
        for union in (Union[int, str], Union[str, int]):  # request ids, progress tokens: pygls passes any JSON
            converter.register_structure_hook(union, _strict_id)
        super().__init__(server, converter)
        self.initialize_received = False
        self.shutdown_received = False
        self.open_requests: set[int | str] = set()
        """Client request ids received and not yet answered: each gets exactly one response."""
        self.on_exit: Callable[[int], None] | None = None
        """Called with the exit code on the `exit` notification (the server ends the process there)."""
        self.bad_input = Throttle(log)
        self.defects = Throttle(log)
        self.stats = {"messages": 0, "parse_errors": 0, "dropped": 0, "errors_sent": 0, "suppressed_responses": 0,
                      "defects": 0}

    # ---- the one way in -----------------------------------------------------------------------------
    def feed(self, body: bytes) -> None:
        """One framed message from the client. Never raises; a request always gets its one response."""
        self.stats["messages"] += 1
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self.stats["parse_errors"] += 1
            msg_id = top_level_id(body)
            self.bad_input(logging.WARNING, "a message that is not JSON (%s bytes): %s", len(body), type(exc).__name__)
            if msg_id is not None and msg_id not in self.open_requests:
                self._reply_error(msg_id, JsonRpcParseError("the message is not valid JSON"))
            return
        try:
            self._feed_object(data)
        except Exception as exc:  # a defect of ours: still answer, and keep serving
            self.stats["defects"] += 1
            self.defects(logging.ERROR, "failed to handle a message: %s", exc, exc_info=True)
            if isinstance(data, dict) and _valid_id(data.get("id")) and data.get("id") in self.open_requests:
                self._reply_error(data["id"], JsonRpcInternalError(f"{type(exc).__name__}"))

    def _drop(self, why: str, *args) -> None:
        self.stats["dropped"] += 1
        self.bad_input(logging.WARNING, "dropped a message: " + why, *args)

    def _reply_error(self, msg_id: Any, error: JsonRpcException) -> None:
        self.stats["errors_sent"] += 1
        if msg_id is not None:
            self.open_requests.add(msg_id)
        self._send_response(msg_id, None, error.to_response_error())

    def _feed_object(self, data: Any) -> None:
        if not isinstance(data, dict):
            self._drop("a JSON %s, not an object (LSP has no batches)", type(data).__name__)
            return
        has_id = "id" in data
        msg_id = data.get("id")
        if "method" in data:
            method = data["method"]
            if has_id:
                if not _valid_id(msg_id):
                    self._reply_error(None, JsonRpcInvalidRequest("a request id must be an integer or a string"))
                    return
                if msg_id in self.open_requests:
                    self._drop("a request reusing the id %r of one still running", msg_id)
                    return
                if not isinstance(method, str) or data.get("jsonrpc") != "2.0":
                    self._reply_error(msg_id, JsonRpcInvalidRequest("not a JSON-RPC 2.0 request"))
                    return
                self._request(msg_id, method, data)
            else:
                if not isinstance(method, str) or data.get("jsonrpc") != "2.0":
                    self._drop("a notification that is not JSON-RPC 2.0")
                    return
                self._notification(method, data)
        elif has_id and ("result" in data or "error" in data) and data.get("jsonrpc") == "2.0" and _valid_id(msg_id):
            self._dispatch(data)  # a reply to one of our requests (e.g. workDoneProgress/create)
        else:
            self._drop("neither a request, a notification nor a response")

    def _request(self, msg_id: int | str, method: str, data: dict) -> None:
        if _is_notification_method(method):
            # pygls would run it as a notification and never answer (or, for `exit`, end the process).
            self._reply_error(msg_id, JsonRpcInvalidRequest(f"{method} is a notification: it takes no id"))
            return
        if method == types.INITIALIZE:
            if self.initialize_received:
                self._reply_error(msg_id, JsonRpcInvalidRequest("initialize was already received"))
                return
        elif not self.initialize_received:
            self._reply_error(msg_id, JsonRpcServerNotInitialized(f"{method} before initialize"))
            return
        if self.shutdown_received:
            self._reply_error(msg_id, JsonRpcInvalidRequest(f"{method} after shutdown"))
            return
        self.open_requests.add(msg_id)
        if method == types.INITIALIZE:
            self.initialize_received = True
        elif method == types.SHUTDOWN:
            self.shutdown_received = True
        self._dispatch(data)

    def _notification(self, method: str, data: dict) -> None:
        if method == types.EXIT:
            code = 0 if self.shutdown_received else 1
            log.info("exit notification (code %d)", code)
            if self.on_exit is not None:
                self.on_exit(code)
            return
        if not self.initialize_received or self.shutdown_received:
            log.debug("dropped a %s notification %s initialize/shutdown", method,
                      "before" if not self.initialize_received else "after")
            return
        if method == types.CANCEL_REQUEST:
            params = data.get("params")
            msg_id = params.get("id") if isinstance(params, dict) else None
            self._cancel(msg_id)
            return
        self._dispatch(data)

    def _cancel(self, msg_id: Any) -> None:
        if not _valid_id(msg_id) or msg_id not in self.open_requests:
            log.debug("cancel for an unknown or finished request %r", msg_id)
            return
        future = self._request_futures.get(msg_id)
        if future is None or future.done():
            log.debug("cancel for request %r: nothing to stop", msg_id)
            return
        future.cancel()  # the request is answered -32800 by its done callback (or with what it had)

    def _dispatch(self, data: dict) -> None:
        try:
            message = self.structure_message(data)  # a request's bad params come back as a _BadRequest
        except JsonRpcException:
            self._drop("a %s with params that do not validate", data.get("method") or "response")
            return
        self.handle_message(message)

    # ---- pygls hooks ----------------------------------------------------------------------------------
    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except (JsonRpcInvalidParams, JsonRpcInternalError):
            if isinstance(data, dict) and "method" in data and "id" in data:
                msg_id = data["id"]
                if not _valid_id(msg_id):
                    return _BadRequest(None, str(data.get("method")), JsonRpcInvalidRequest("invalid request id"))
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}")
                return _BadRequest(msg_id, str(data["method"]), error)
            raise

    def handle_message(self, message):
        if isinstance(message, _BadRequest):
            self.bad_input(logging.WARNING, "answered %s request %r with %s", message.method, message.id,
                           type(message.error).__name__)
            self.stats["errors_sent"] += 1
            self._send_response(message.id, None, message.error.to_response_error())
            return None
        return super().handle_message(message)

    def _send_response(self, msg_id, result=None, error=None):
        if msg_id is not None:
            if msg_id not in self.open_requests:
                # A second answer (e.g. a handler finishing after its cancel was answered) or an id the
                # client never sent: either would confuse the client more than silence.
                self.stats["suppressed_responses"] += 1
                log.error("suppressed a response to request %r: it was answered already or never asked", msg_id)
                return
            self.open_requests.discard(msg_id)
        super()._send_response(msg_id, result, error)

    def _handle_cancel_notification(self, msg_id):
        self._cancel(msg_id)  # quiet: pygls warns for every unknown id

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        general = params.capabilities.general
        offered = list(general.position_encodings or []) if general else []
        # UTF-8 first (tree-sitter counts bytes), then UTF-32 (code points: Python's own indexing), else UTF-16.
        kinds = types.PositionEncodingKind
        chosen = next((k for k in (kinds.Utf8, kinds.Utf32) if k in offered), kinds.Utf16)
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
