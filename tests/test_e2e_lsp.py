"""End to end over stdio: the real server process, a scripted model worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from lsp_raw import RawClient, inline_params

FAKE = {"outputs": ["a + b"], "token_delay_ms": 2}


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "lsp_server", "serve", "--fake-engine", json.dumps(FAKE)])
)
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(types.InitializeParams(capabilities=client_capabilities("visual-studio-code")))
    yield
    await lsp_client.shutdown_session()


async def _wait_ready(lsp_client: LanguageClient) -> None:
    for _ in range(400):
        status = await lsp_client.protocol.send_request_async("offpilot/status", {})
        if status.state == "ready":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("model worker never became ready")


async def test_open_change_and_complete(client: LanguageClient):
    await _wait_ready(client)
    uri = "file:///project/add.py"
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text="def add(a, b):\n    return\n"))
    )
    at_end = types.Position(line=1, character=10)
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at_end, end=at_end), text=" ")],
        )
    )
    result = await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=1, character=11),
        )
    )
    items = result.items if isinstance(result, types.InlineCompletionList) else result
    assert [i.insert_text for i in items] == ["a + b"]
    cursor = types.Position(line=1, character=11)
    assert items[0].range == types.Range(start=cursor, end=cursor)


# ---- raw-protocol tests: exact ids, malformed params, killed workers ------------------------------------


async def raw(fake: dict, caps: dict | None = None) -> RawClient:
    client = await RawClient.start("--fake-engine", json.dumps(fake))
    await client.initialize(caps)
    assert (await client.wait_ready())["state"] == "ready"
    return client


@pytest.mark.parametrize(
    "offered, chosen",
    [(["utf-16", "utf-8"], "utf-8"), (["utf-16", "utf-32"], "utf-32"), (["utf-8", "utf-32", "utf-16"], "utf-8"),
     (["utf-16"], "utf-16"), (None, "utf-16")],
)
async def test_position_encoding_negotiation(offered, chosen):
    caps = {"textDocument": {"inlineCompletion": {}}}
    if offered is not None:
        caps["general"] = {"positionEncodings": offered}
    client = await RawClient.start("--fake-engine", "{}")
    try:
        reply = await client.initialize(caps)
        assert reply["result"]["capabilities"]["positionEncoding"] == chosen
        assert reply["result"]["capabilities"]["inlineCompletionProvider"]
    finally:
        await client.close()


async def test_utf8_positions_after_multibyte_text():
    client = await raw({"outputs": ["1"]}, {"general": {"positionEncodings": ["utf-8"]}, "textDocument": {"inlineCompletion": {}}})
    try:
        uri = "file:///u.py"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "s = '😀'\nn = \n"}})
        # Insert at byte 8 of line 0 (after the emoji, 4 bytes) — then complete on line 1.
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"range": {"start": {"line": 0, "character": 9}, "end": {"line": 0, "character": 9}}, "text": "!"}]})
        status = (await client.request("offpilot/status", {}))["result"]
        assert status["positionEncoding"] == "utf-8"
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 4))
        assert reply["result"]["items"][0]["insertText"] == "1"
    finally:
        await client.close()


async def test_invalid_params_get_an_error_reply_with_the_same_id():
    client = await raw({})
    try:
        cases = [
            {"textDocument": {"uri": "file:///x.py"}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 0}},
            {"textDocument": {"uri": "file:///x.py"}, "position": {"line": "zero", "character": 0}, "context": {"triggerKind": 1}},
            {"position": {"line": 0, "character": 0}},
        ]
        for params in cases:
            reply = await client.request("textDocument/inlineCompletion", params, timeout_s=2)
            assert reply["error"]["code"] == -32602
        # ...and the server still answers normally afterwards.
        assert (await client.request("textDocument/inlineCompletion", inline_params("file:///never-opened.py", 0, 0)))["result"] == {"items": []}
        unknown = await client.request("offpilot/noSuchMethod", {})
        assert unknown["error"]["code"] == -32601
    finally:
        await client.close()
    assert client.non_frame_bytes == b""


async def test_burst_of_keystrokes_every_id_answered_exactly_once():
    # A prefill that can only stop every 100 ms, as a real one stops only between chunks.
    client = await raw({"outputs": ["value + 1"], "token_delay_ms": 15, "prefill_delay_ms": 100, "prefill_chunk_ms": 100})
    uri = "file:///burst.py"
    text = "def f(value):\n    return \n"
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})
    ids = []
    typed = "value * 2 if value else 0 and some more text here!"[:50]
    try:
        for i, ch in enumerate(typed):
            col = 11 + i
            client.notify(
                "textDocument/didChange",
                {"textDocument": {"uri": uri, "version": i + 2}, "contentChanges": [{"range": {"start": {"line": 1, "character": col}, "end": {"line": 1, "character": col}}, "text": ch}]},
            )
            if ids and i % 2 == 0:
                client.notify("$/cancelRequest", {"id": ids[-1]})  # as VS Code does for a superseded request
            ids.append(client.request_nowait("textDocument/inlineCompletion", inline_params(uri, 1, col + 1)))
            await asyncio.sleep(0.02)
        for msg_id in ids:
            await client.wait_response(msg_id, timeout_s=10)
        await asyncio.sleep(0.3)  # any duplicate would arrive by now
        assert set(client.responses) <= set(client.sent_ids)  # no reply to an id never sent
        assert [len(client.responses[i]) for i in ids] == [1] * len(ids)
        for i in ids:
            reply = client.responses[i][0]
            assert "result" in reply or reply["error"]["code"] == -32800
        last = client.responses[ids[-1]][0]
        assert last["result"]["items"][0]["insertText"] == "value + 1"
        status = (await client.request("offpilot/status", {}))["result"]
        # Requests superseded while an earlier generation was still stopping never reached the model.
        assert status["generationsStarted"] < len(ids) / 2
    finally:
        await client.close()
    assert client.non_frame_bytes == b""


async def test_worker_killed_mid_generation_request_answered_and_next_served():
    client = await raw({"outputs": ["x " * 300], "token_delay_ms": 20})
    try:
        uri = "file:///k.py"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    \n"}})
        pid = (await client.request("offpilot/status", {}))["result"]["workerPid"]
        msg_id = client.request_nowait("textDocument/inlineCompletion", inline_params(uri, 1, 4))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        reply = await client.wait_response(msg_id, timeout_s=2)
        assert reply["result"] == {"items": []}
        status = await client.wait_ready(timeout_s=15)
        assert status["state"] == "ready" and status["workerPid"] != pid
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 4), timeout_s=20)
        assert reply["result"]["items"], reply
    finally:
        assert await client.close() == 0
    assert client.non_frame_bytes == b""


async def test_requests_while_the_model_loads_get_empty_answers_and_progress():
    client = await RawClient.start("--fake-engine", json.dumps({"load_delay_ms": 1500}))
    try:
        await client.initialize()
        uri = "file:///l.py"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = \n"}})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 0, 4), timeout_s=1)
        assert reply["result"] == {"items": []}
        assert (await client.wait_ready())["state"] == "ready"
        kinds = [n["params"]["value"]["kind"] for n in client.notifications if n["method"] == "$/progress"]
        assert kinds == ["begin", "end"]
        assert any(r["method"] == "window/workDoneProgress/create" for r in client.server_requests)
    finally:
        await client.close()


async def test_missing_model_file_one_message_and_empty_answers(tmp_path):
    client = await RawClient.start("--model", str(tmp_path / "missing.gguf"))
    try:
        await client.initialize()
        status = await client.wait_ready()
        assert status["state"] in ("failed", "stopped")
        uri = "file:///m.py"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = \n"}})
        for _ in range(3):
            reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 0, 4))
            assert reply["result"] == {"items": []}
        shown = [n for n in client.notifications if n["method"] == "window/showMessage"]
        assert len(shown) == 1 and "missing.gguf" in shown[0]["params"]["message"]
    finally:
        await client.close()


async def test_a_restarted_server_answers_from_the_disk_cache_and_survives_a_corrupted_one(tmp_path, private_cache_dir):
    record = tmp_path / "requests.jsonl"
    fake = {"outputs": ["a + b"], "record_path": str(record)}
    uri = "file:///cached.py"
    text = "def add(a, b):\n    return \n"

    async def session() -> tuple[dict, dict]:
        client = await raw(fake)
        try:
            client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})
            reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 11), timeout_s=10)
            status = (await client.request("offpilot/status", {}))["result"]
        finally:
            assert await client.close() == 0
        return reply, status

    first, status = await session()
    assert [i["insertText"] for i in first["result"]["items"]] == ["a + b"] and status["cache"]["misses"] == 1
    second, status = await session()
    assert second["result"] == first["result"] and status["cache"]["diskHits"] == 1
    assert len(record.read_text().splitlines()) == 1  # the model ran once over both sessions

    (private_cache_dir / "cache.db").write_bytes(b"garbage" * 1000)
    third, status = await session()
    assert third["result"] == first["result"] and status["cache"]["misses"] == 1
    assert len(record.read_text().splitlines()) == 2


async def test_settings_change_applies_to_the_next_request():
    client = await raw({"outputs": ["a + b"]})
    try:
        uri = "file:///conf.py"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                "text": "def add(a, b):\n    return \n"}})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 11))
        assert reply["result"]["items"]
        client.notify("workspace/didChangeConfiguration", {"settings": {"offpilot": {"completion": {"enabled": False}}}})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 11))
        assert reply["result"] == {"items": []}
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 1, "character": 11}, "end": {"line": 1, "character": 11}}, "text": "a"}]})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 12))
        assert reply["result"] == {"items": []}  # typing the shown suggestion's start: still off
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 3}, "contentChanges": [
            {"range": {"start": {"line": 1, "character": 11}, "end": {"line": 1, "character": 12}}, "text": ""}]})
        client.notify("workspace/didChangeConfiguration", {"settings": {"completion": {"enabled": True, "maxLines": "x"}}})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, 1, 11))
        assert reply["result"]["items"]  # the bad value is ignored, the good one applied
    finally:
        assert await client.close() == 0
