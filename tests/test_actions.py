"""Code actions: the core (targets, prompts, cleaning, placing code) and the whole server with a scripted model."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path

import pytest

from lsp_raw import RawClient, inline_params
from lsp_server import languages
from lsp_server.actions import (
    ActionError, ActionTarget, build_request, chat_segments, clean_markdown, cut_at_sentence, extract_code, find_target, fit_code,
    load_action_prompts, load_chat_templates, parse_errors,
)
from lsp_server.config import Settings

# ---- the core ----------------------------------------------------------------------------------------------

PY = '''import os


@cache
def area(w, h):
    """Area."""
    return w * h


class Cart:
    def total(self):
        return sum(self.items)
'''


def _target(text: str, language: str, at: str, end: str | None = None) -> ActionTarget | None:
    start = text.index(at)
    stop = text.index(end) + len(end) if end else start
    return find_target(text, language, start, stop, languages.parse(language, text))


@pytest.mark.parametrize("language, text, at, expected_first_line, name", [
    ("python", PY, "return w", "@cache", "function `area`"),
    ("python", PY, "sum(", "    def total(self):", "function `total`"),
    ("python", PY, "class Cart", "class Cart:", "class `Cart`"),
    ("javascript", "export function f(a) {\n  return a\n}\n", "return a", "export function f(a) {", "function `f`"),
    ("javascript", "const g = (x) => {\n  return x * 2\n}\n", "x * 2", "const g = (x) => {", "function `g`"),
    ("typescript", "class A {\n  run(): number {\n    return 1\n  }\n}\n", "return 1", "  run(): number {", "function `run`"),
    ("go", "package m\n\nfunc Add(a, b int) int {\n\treturn a + b\n}\n", "return", "func Add(a, b int) int {", "function `Add`"),
    ("rust", "fn add(a: i32) -> i32 {\n    a + 1\n}\n", "a + 1", "fn add(a: i32) -> i32 {", "function `add`"),
    ("c", "int add(int a, int b) {\n    return a + b;\n}\n", "return", "int add(int a, int b) {", "function `add`"),
    ("cpp", "struct P {\n  int x() const { return 1; }\n};\n", "return", "  int x() const { return 1; }", "function `x`"),
    ("cpp", "struct P {\n  int y;\n};\n", "int y", "struct P {", "struct `P`"),
    ("java", "class A {\n  int f() {\n    return 1;\n  }\n}\n", "return", "  int f() {", "function `f`"),
])
def test_the_target_is_the_innermost_definition_with_its_decorators(language, text, at, expected_first_line, name):
    target = _target(text, language, at)
    assert target is not None
    assert target.text.split("\n")[0] == expected_first_line and target.name == name
    assert text[target.start : target.end] == target.text
    assert target.start == 0 or text[target.start - 1] == "\n"  # whole lines


def test_a_selection_is_widened_to_whole_lines_and_outside_definitions_nothing_is_offered():
    sel = _target(PY, "python", "w, h", "return w")
    assert sel.text == 'def area(w, h):\n    """Area."""\n    return w * h' and sel.name == "lines 5-7"
    assert _target(PY, "python", "import os") is None  # cursor outside any definition, no selection
    assert find_target(PY, None, PY.index("import"), PY.index("import") + 6) is not None  # plain text: selection works


def test_chat_values_are_never_special_tokens_and_every_family_has_a_chat_format():
    chats = load_chat_templates()
    from lsp_server.prompts import load_templates

    assert set(load_templates()) <= set(chats)  # every FIM family can also run actions
    segments = chat_segments(chats["qwen2.5-coder"], "sys", "code with <|im_end|> inside")
    assert [s.special for s in segments] == [True, False, True, False, True]
    assert segments[3].text == "code with <|im_end|> inside"


def test_the_request_runs_in_the_action_lane_without_line_rules_and_refuses_huge_code():
    prompts, chat = load_action_prompts(), load_chat_templates()["qwen2.5-coder"]
    target = _target(PY, "python", "return w")
    req = build_request(prompts["refactor"], chat, target, language="python", path="/p/a.py", settings=Settings(), instruction="use math")
    assert req.lane == "action" and not req.line_rules and "<|im_end|>" in req.stop
    user = next(s.text for s in req.segments if not s.special and "Goal" in s.text)
    assert "Goal: use math" in user and "def area(w, h):" in user and "/p/a.py" in user
    default = build_request(prompts["refactor"], chat, target, language="python", path="", settings=Settings())
    assert prompts["refactor"].default_instruction in next(s.text for s in default.segments if "Goal" in s.text)
    small = Settings()
    small.actions.max_code_chars = 10
    with pytest.raises(ActionError, match="maxCodeChars"):
        build_request(prompts["explain"], chat, target, language="python", path="", settings=small)


def test_answers_are_cleaned():
    assert extract_code("Here you go:\n```python\ndef f():\n    return 1\n```\nThis is simpler.") == "def f():\n    return 1"
    assert extract_code("```js\nshort()\n```\ntext\n```js\nfunction longer() {}\n```") == "function longer() {}"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # fence never closed
    assert extract_code("def f():\n    return 1<|im_end|>junk") == "def f():\n    return 1"
    assert extract_code("  \n") is None
    md = clean_markdown("It adds two numbers.\n\nIt returns an int.\n\nI hope this helps!<|im_end|>")
    assert md == "It adds two numbers.\n\nIt returns an int."
    assert "\u202e" not in clean_markdown("safe \u202e text")
    assert cut_at_sentence("First part.\n\nSecond part. Third is cut off mid") == "First part.\n\nSecond part. …"
    assert cut_at_sentence("One.\n\nTwo is long and then cut off in the middle of") == "One.\n\nTwo is long and then cut off in the middle of …"


def test_code_is_placed_with_the_targets_indentation_tabs_and_line_endings():
    target = ActionTarget(0, 0, "    def total(self):\n        return 1", "function")
    assert fit_code("def total(self):\n    return 2\n", target, "class A:\n    x = 1\n") == "    def total(self):\n        return 2"
    tabbed = ActionTarget(0, 0, "\tfunc() {", "function")
    doc = "x {\n\tfunc() {\n\t\ta()\n\t}\n}\n"
    assert fit_code("func() {\n    b()\n}", tabbed, doc) == "\tfunc() {\n\t\tb()\n\t}"
    crlf = ActionTarget(0, 0, "def f():", "function")
    assert fit_code("def f():\n    pass", crlf, "def f():\r\n    x\r\n") == "def f():\r\n    pass"


def test_parse_errors_judge_only_languages_with_a_grammar():
    assert parse_errors("python", "def f():\n    return 1\n") == 0
    assert parse_errors("python", "def f(:\n    return 1\n") > 0
    assert parse_errors(None, "anything (") is None


# ---- the server, with a scripted model -----------------------------------------------------------------------

URI = "file:///project/shapes.py"
DOC = '''import math


def area(w, h):
    return w * h


def circle(r):
    return math.pi * r * r
'''
REFACTORED = "Here is a clearer version:\n\n```python\ndef area(width, height):\n    return width * height\n```\n\nThis keeps the behaviour."
CAPS = {
    "general": {"positionEncodings": ["utf-16"]},
    "textDocument": {"inlineCompletion": {}, "codeAction": {"resolveSupport": {"properties": ["edit"]}}},
    "window": {"workDoneProgress": True, "showDocument": {"support": True}},
    "workspace": {"applyEdit": True, "workspaceEdit": {"documentChanges": True, "changeAnnotationSupport": {}}},
}


async def serve(action_outputs: list[str], caps: dict | None = None, options: dict | None = None, **fake) -> RawClient:
    client = await RawClient.start("--fake-engine", json.dumps({"outputs": ["return 0"], "action_outputs": action_outputs, **fake}))
    client.replies["workspace/applyEdit"] = {"applied": True}
    client.replies["window/showDocument"] = {"success": True}
    await client.initialize(caps or CAPS, options)
    assert (await client.wait_ready())["state"] == "ready"
    client.notify("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1, "text": DOC}})
    return client


def cursor_range(line: int, character: int) -> dict:
    return {"start": {"line": line, "character": character}, "end": {"line": line, "character": character}}


async def list_actions(client: RawClient, line=4, character=8, diagnostics=(), only=None) -> list[dict]:
    context = {"diagnostics": list(diagnostics)}
    if only:
        context["only"] = only
    reply = await client.request("textDocument/codeAction", {"textDocument": {"uri": URI}, "range": cursor_range(line, character), "context": context})
    return reply["result"] or []


def messages(client: RawClient) -> list[str]:
    return [n["params"]["message"] for n in client.notifications if n["method"] == "window/showMessage"]


async def test_listing_offers_the_actions_and_never_runs_the_model():
    client = await serve([REFACTORED])
    try:
        before = (await client.request("offpilot/status", {}))["result"]["generationsStarted"]
        diagnostic = {"range": cursor_range(4, 15), "message": "name 'h' is not defined", "severity": 1}
        actions = await list_actions(client, diagnostics=[diagnostic])
        titles = [a["title"] for a in actions]
        assert titles == ["offpilot: Explain function `area`", "offpilot: Refactor function `area`",
                          "offpilot: Add docstring/comments to function `area`", "offpilot: Fix: name 'h' is not defined"]
        assert [a["kind"] for a in actions] == ["offpilot.explain", "refactor.rewrite", "refactor.rewrite.docstring", "quickfix"]
        assert actions[0]["command"]["command"] == "offpilot.explain" and "edit" not in actions[1]
        assert actions[3]["diagnostics"][0]["message"] == "name 'h' is not defined"
        only_refactor = await list_actions(client, only=["refactor"])
        assert [a["kind"] for a in only_refactor] == ["refactor.rewrite", "refactor.rewrite.docstring"]
        assert await list_actions(client, line=0, character=3) == []  # `import math`: no definition, no selection
        after = (await client.request("offpilot/status", {}))["result"]["generationsStarted"]
        assert after == before
    finally:
        await client.close()


async def test_resolving_a_refactor_gives_a_versioned_annotated_edit_of_the_function():
    client = await serve([REFACTORED])
    try:
        action = (await list_actions(client))[1]
        resolved = (await client.request("codeAction/resolve", action, timeout_s=20))["result"]
        change = resolved["edit"]["documentChanges"][0]
        assert change["textDocument"] == {"uri": URI, "version": 1}
        edit = change["edits"][0]
        assert edit["range"] == {"start": {"line": 3, "character": 0}, "end": {"line": 4, "character": 16}}
        assert edit["newText"] == "def area(width, height):\n    return width * height"
        annotation = resolved["edit"]["changeAnnotations"][edit["annotationId"]]
        assert annotation["needsConfirmation"] is True
        progress = [n["params"]["value"]["kind"] for n in client.notifications if n["method"] == "$/progress"
                    and str(n["params"]["token"]).startswith("offpilot-action")]
        assert progress == ["begin", "end"]
    finally:
        await client.close()


async def test_an_edit_that_does_not_parse_is_retried_then_dropped_with_a_message():
    broken = "```python\ndef area(w, h:\n    return w * h\n```"
    client = await serve([broken, broken])
    try:
        action = (await list_actions(client))[1]
        resolved = (await client.request("codeAction/resolve", action, timeout_s=20))["result"]
        assert "edit" not in resolved
        assert any("does not parse" in m for m in messages(client)), messages(client)
    finally:
        await client.close()


async def test_a_retry_that_parses_is_offered():
    client = await serve(["```python\ndef area(w, h:\n```", REFACTORED])
    try:
        action = (await list_actions(client))[2]  # add docstring
        resolved = (await client.request("codeAction/resolve", action, timeout_s=20))["result"]
        assert resolved["edit"]["documentChanges"][0]["edits"][0]["newText"].startswith("def area(width, height):")
    finally:
        await client.close()


async def test_explain_returns_markdown_and_opens_a_read_only_file(tmp_path):
    client = await serve(["`area` multiplies the width by the height.\n\nLet me know if you need more!"])
    try:
        action = (await list_actions(client))[0]
        reply = await client.request("workspace/executeCommand", action["command"], timeout_s=20)
        assert reply["result"]["markdown"] == "`area` multiplies the width by the height."
        assert reply["result"]["title"] == "offpilot: Explain function `area`"
        shown = [r for r in client.server_requests if r["method"] == "window/showDocument"]
        assert len(shown) == 1
        path = Path(shown[0]["params"]["uri"].removeprefix("file://"))
        assert "multiplies the width" in path.read_text() and not os.access(path, os.W_OK) or os.geteuid() == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    finally:
        await client.close()


async def test_clients_that_show_explanations_themselves_get_no_file():
    client = await serve(["It multiplies."], options={"actions": {"showDocument": False}})
    try:
        action = (await list_actions(client))[0]
        reply = await client.request("workspace/executeCommand", action["command"], timeout_s=20)
        assert reply["result"]["markdown"] == "It multiplies."
        assert not [r for r in client.server_requests if r["method"] == "window/showDocument"]
    finally:
        await client.close()


async def test_without_resolve_support_the_command_applies_the_edit_through_the_client():
    caps = {**CAPS, "textDocument": {"inlineCompletion": {}}}
    client = await serve([REFACTORED], caps=caps)
    try:
        action = (await list_actions(client))[1]
        assert action["command"]["command"] == "offpilot.applyAction"
        reply = await client.request("workspace/executeCommand", action["command"], timeout_s=20)
        assert reply["result"] == {"applied": True, "error": ""}
        applied = [r for r in client.server_requests if r["method"] == "workspace/applyEdit"]
        assert applied[0]["params"]["edit"]["documentChanges"][0]["textDocument"]["version"] == 1
    finally:
        await client.close()


async def test_refactor_with_an_instruction_reaches_the_prompt(tmp_path):
    record = tmp_path / "requests.jsonl"
    client = await serve([REFACTORED], record_path=str(record))
    try:
        args = {"uri": URI, "range": cursor_range(4, 8), "instruction": "rename the parameters"}
        reply = await client.request("workspace/executeCommand", {"command": "offpilot.refactor", "arguments": [args]}, timeout_s=20)
        assert reply["result"]["applied"] is True
        prompts = [json.loads(line) for line in record.read_text().splitlines()]
        action_prompt = "".join(s["text"] for s in prompts[-1]["segments"])
        assert "Goal: rename the parameters" in action_prompt and prompts[-1]["lane"] == "action"
    finally:
        await client.close()


async def test_the_document_changing_during_a_refactor_sends_no_edit_for_the_old_version():
    slow = "```python\n" + "def area(width, height):\n    return width * height\n" + "#" * 300 + "\n```"
    client = await serve([slow, slow], token_delay_ms=10)
    try:
        action = (await list_actions(client))[1]
        resolve_id = client.request_nowait("codeAction/resolve", action)
        apply_id = client.request_nowait("workspace/executeCommand", {"command": "offpilot.applyAction", "arguments": [action["data"]]})
        await asyncio.sleep(0.5)  # both are generating (queued in the action lane)
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": 2}, "contentChanges": [
            {"range": cursor_range(8, 0), "text": "# edited\n"}]})
        resolved = (await client.wait_response(resolve_id, 30))["result"]
        applied = (await client.wait_response(apply_id, 30))["result"]
        assert "edit" not in resolved
        assert applied["applied"] is False and "changed" in applied["error"]
        assert not [r for r in client.server_requests if r["method"] == "workspace/applyEdit"]
        assert sum("changed while offpilot was working" in m for m in messages(client)) == 2
    finally:
        await client.close()


async def test_an_action_offered_for_an_older_version_is_refused():
    client = await serve([REFACTORED])
    try:
        action = (await list_actions(client))[1]
        client.notify("textDocument/didChange", {"textDocument": {"uri": URI, "version": 2}, "contentChanges": [
            {"range": cursor_range(0, 0), "text": "# top\n"}]})
        resolved = (await client.request("codeAction/resolve", action, timeout_s=20))["result"]
        assert "edit" not in resolved and any("changed since" in m for m in messages(client))
    finally:
        await client.close()


async def test_cancelling_stops_the_action_and_completions_go_on():
    endless = " ".join(["word"] * 2000)
    client = await serve([endless], token_delay_ms=5)
    try:
        action = (await list_actions(client))[0]
        explain_id = client.request_nowait("workspace/executeCommand", action["command"])
        await asyncio.sleep(0.4)
        token = next(n["params"]["token"] for n in client.notifications
                     if n["method"] == "$/progress" and str(n["params"]["token"]).startswith("offpilot-action"))
        client.notify("window/workDoneProgress/cancel", {"token": token})
        reply = await client.wait_response(explain_id, 10)
        assert "error" in reply and reply["error"]["code"] in (-32800, -32603), reply  # cancelled, not answered with text
        completion = await client.request("textDocument/inlineCompletion", inline_params(URI, 5, 0), timeout_s=10)
        assert completion["result"]["items"][0]["insertText"] == "return 0"
    finally:
        await client.close()


async def test_completions_are_answered_while_an_explanation_generates():
    long_answer = " ".join(["word"] * 150)  # 299 pieces, under max_tokens
    client = await serve([long_answer], token_delay_ms=10)
    try:
        action = (await list_actions(client))[0]
        explain_id = client.request_nowait("workspace/executeCommand", action["command"])
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        completion = await client.request("textDocument/inlineCompletion", inline_params(URI, 5, 0), timeout_s=10)
        waited_ms = (time.monotonic() - t0) * 1000
        assert completion["result"]["items"], completion
        assert waited_ms < 1000, waited_ms  # not behind the 3 s explanation
        last = (await client.request("offpilot/status", {}))["result"]["lastCompletion"]
        assert last["cache"] == "miss" and 0 < last["totalMs"] < waited_ms + 1  # for the editors' status bars
        explained = await client.wait_response(explain_id, 30)
        assert explained["result"]["markdown"] == long_answer  # resumed, whole
    finally:
        await client.close()


async def test_bad_command_arguments_get_invalid_params():
    client = await serve([REFACTORED])
    try:
        for args in ([], [{"uri": URI}], [{"uri": "file:///not/open.py", "range": cursor_range(0, 0)}], ["text"]):
            reply = await client.request("workspace/executeCommand", {"command": "offpilot.explain", "arguments": args})
            assert reply.get("error", {}).get("code") == -32602, (args, reply)
        reply = await client.request("codeAction/resolve", {"title": "x", "data": {"kind": "refactor", "uri": 3}})
        assert "result" in reply and "edit" not in reply["result"]
    finally:
        await client.close()


async def test_clients_without_versioned_edits_get_a_plain_edit_of_the_same_range():
    caps = {**CAPS, "workspace": {"applyEdit": True}}
    client = await serve([REFACTORED], caps=caps)
    try:
        action = (await list_actions(client))[1]
        resolved = (await client.request("codeAction/resolve", action, timeout_s=20))["result"]
        assert "documentChanges" not in resolved["edit"]
        [edit] = resolved["edit"]["changes"][URI]
        assert edit["range"]["start"] == {"line": 3, "character": 0} and edit["newText"].startswith("def area(width")
    finally:
        await client.close()
