"""Real llama.cpp through the whole server: the tiny generated GGUF, and the small default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from lsp_raw import REPO, RawClient, inline_params

SAMPLE = '''"""Small helpers."""


def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return 


def is_even(n: int) -> bool:
    return n % 2 == 0
'''


async def _serve_and_complete(model, text: str, line: int, character: int, uri: str = "file:///project/helpers.py", language_id: str = "python"):
    client = await RawClient.start("--model", str(model))
    try:
        await client.initialize()
        status = await client.wait_ready(timeout_s=120)
        assert status["state"] == "ready", status
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": language_id, "version": 1, "text": text}})
        reply = await client.request("textDocument/inlineCompletion", inline_params(uri, line, character, trigger=1), timeout_s=120)
    finally:
        await client.close()
    assert client.non_frame_bytes == b"", "stdout must carry JSON-RPC frames only, also while the model loads"
    return status, reply


async def test_tiny_gguf_runs_every_llama_path_through_the_lsp(tiny_gguf):
    # Plain text: no grammar, so the syntax check cannot (rightly) throw the random model's nonsense away.
    status, reply = await _serve_and_complete(tiny_gguf, "Some notes.\nThe next word is \n", 1, 16, "file:///project/notes.txt", "plaintext")
    assert status["family"] == "qwen2.5-coder"  # detected from the GGUF's own vocabulary
    items = reply["result"]["items"]
    assert len(items) == 1  # random weights: nonsense, but printable text came back through the pipeline
    text = items[0]["insertText"]
    assert text.strip() and "<|" not in text and "\n" not in text  # single-line mode after `return `


async def test_default_model_completes_sensibly_through_the_lsp(default_model):
    status, reply = await _serve_and_complete(default_model, SAMPLE, 5, 11)
    assert status["family"] == "qwen2.5-coder"
    items = reply["result"]["items"]
    assert items, reply
    suggestion = items[0]["insertText"]
    assert "a + b" in suggestion.replace("b + a", "a + b"), suggestion
    assert items[0]["range"]["start"] == {"line": 5, "character": 11}


def test_cli_complete_prints_the_suggestion_and_timings(tiny_gguf, tmp_path):
    sample = tmp_path / "notes.txt"  # no grammar: the random model's text is not thrown away by the syntax check
    sample.write_text("Some notes.\nThe next word is \n")
    out = subprocess.run(
        [sys.executable, "-m", "lsp_server", "complete", f"{sample}:2:17", "--model", str(tiny_gguf)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    assert "--- suggestion ---" in out.stdout
    assert "timings: load" in out.stdout and "prefill" in out.stdout and "total" in out.stdout
    # On an empty line (a multi-line suggestion) too: the whole generation, with its real token counts.
    out = subprocess.run(
        [sys.executable, "-m", "lsp_server", "complete", f"{sample}:3:1", "--model", str(tiny_gguf)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    prompt_tokens = re.search(r"tokens: (\d+) in the prompt", out.stdout)
    assert prompt_tokens and int(prompt_tokens.group(1)) > 0, out.stdout


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "lsp_server", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for command in ("serve", "complete", "models"):
        assert command in out.stdout


def test_cli_complete_reports_bad_locations(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lsp_server", "complete", str(tmp_path / "nope.py") + ":1:1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "nope.py" in out.stderr


def test_min_tokens_keeps_the_model_from_ending_early(default_model):
    from lsp_server.engine.backends import LlamaBackend
    from lsp_server.engine.protocol import GenerationRequest
    from lsp_server.prompts import Segment

    backend = LlamaBackend({"model_path": str(default_model), "n_ctx": 1024})
    segments = [
        Segment("<|fim_prefix|>", True), Segment("def total(items):\n    return sum(items)\n"),
        Segment("<|fim_suffix|>", True), Segment("\n\ndef mean(items):\n    return total(items) / len(items)\n"),
        Segment("<|fim_middle|>", True),
    ]

    def run(min_tokens: int):
        request = GenerationRequest(segments=segments, single_line=False, max_tokens=24, min_tokens=min_tokens, stop=["<|file_sep|>"])
        return backend.generate(request, lambda *_: None)

    free = run(0)
    assert free.finish == "eog", free  # this spot is complete: the model ends early on its own
    held = run(free.generated_tokens)  # the end token it chose last time is now forbidden
    assert held.generated_tokens > free.generated_tokens, (free, held)


def test_an_action_parked_for_a_completion_resumes_to_the_same_text(default_model):
    """Lanes: the action's KV cells are parked while a completion runs, and brought back; greedy decoding
    must then give exactly the text of an uninterrupted run (a wrong restore would change it)."""
    from lsp_server.engine.backends import LlamaBackend
    from lsp_server.engine.protocol import GenerationRequest
    from lsp_server.prompts import Segment

    backend = LlamaBackend({"model_path": str(default_model), "n_ctx": 2048})
    chat = [
        Segment("<|im_start|>user\n", True),
        Segment("Explain in two sentences what this does:\n\ndef area(w, h):\n    return w * h\n"),
        Segment("<|im_end|>\n<|im_start|>assistant\n", True),
    ]

    def action(**kw):
        return GenerationRequest(segments=chat, lane="action", line_rules=False, max_tokens=40, stop=["<|im_end|>"], **kw)

    fim = GenerationRequest(segments=[Segment("<|fim_prefix|>", True), Segment("def double(x):\n    return "),
                                      Segment("<|fim_suffix|>", True), Segment("\n"), Segment("<|fim_middle|>", True)])
    whole = backend.generate(action(), lambda *_: None)
    assert whole.finish in ("eog", "length") and len(whole.text) > 20, whole

    steps = iter([None] * 12 + ["yield"])
    first = backend.generate(action(), lambda *_: next(steps, None))
    assert first.finish == "yielded" and 0 < len(first.tokens) < 40, first
    between = backend.generate(fim, lambda *_: None)
    assert between.text.strip(), between
    rest = backend.generate(action(resume_tokens=first.tokens, resume_text=first.text), lambda *_: None)
    assert rest.text == whole.text, (first.text, rest.text)
    assert rest.reused_tokens >= rest.prompt_tokens + len(first.tokens) - 1  # nothing evaluated again


ACTION_SAMPLE = '''def count_words(text):
    counts = {}
    for word in text.split():
        if word in counts:
            counts[word] = counts[word] + 1
        else:
            counts[word] = 1
    return counts
'''


async def test_default_model_explains_and_refactors_a_small_function(default_model):
    """The real 0.5B model through the LSP: an explanation in prose, and a refactor that parses."""
    from lsp_server.actions import parse_errors

    uri = "file:///project/words.py"
    client = await RawClient.start("--model", str(default_model))
    client.replies["workspace/applyEdit"] = {"applied": True}
    try:
        caps = {"textDocument": {"codeAction": {"resolveSupport": {"properties": ["edit"]}}},
                "workspace": {"workspaceEdit": {"documentChanges": True}}}
        await client.initialize(caps, {"actions": {"showDocument": False}})
        assert (await client.wait_ready(timeout_s=120))["state"] == "ready"
        client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": ACTION_SAMPLE}})
        at = {"start": {"line": 2, "character": 8}, "end": {"line": 2, "character": 8}}
        listed = (await client.request("textDocument/codeAction", {"textDocument": {"uri": uri}, "range": at, "context": {"diagnostics": []}}))["result"]
        explain, refactor = listed[0], listed[1]
        explained = (await client.request("workspace/executeCommand", explain["command"], timeout_s=300))["result"]
        words = explained["markdown"].lower()
        assert len(words.split()) >= 10 and ("word" in words or "count" in words), explained
        resolved = (await client.request("codeAction/resolve", refactor, timeout_s=300))["result"]
        new_text = resolved["edit"]["documentChanges"][0]["edits"][0]["newText"]
        assert new_text.startswith("def count_words(") and new_text != ACTION_SAMPLE.rstrip("\n")
        assert parse_errors("python", new_text + "\n") == 0, new_text
        print("\n--- explanation ---\n" + explained["markdown"] + "\n--- refactor ---\n" + new_text)  # stdout-ok
    finally:
        await client.close()


def test_healing_lets_the_model_finish_a_word_cut_at_the_cursor(default_model):
    """With the cursor line forced as the start of the middle, its last word's tokens are taken back and only
    continuations of that text are allowed: "    retu" becomes "return ..." instead of a new word after "retu"."""
    from lsp_server.engine.backends import LlamaBackend
    from lsp_server.engine.protocol import GenerationRequest
    from lsp_server.prompts import Segment

    backend = LlamaBackend({"model_path": str(default_model), "n_ctx": 1024})

    def run(middle: str, heal: bool):
        segments = [
            Segment("<|fim_prefix|>", True), Segment("def add(a, b):\n"),
            Segment("<|fim_suffix|>", True), Segment("\n\nprint(add(1, 2))\n"),
            Segment("<|fim_middle|>", True), Segment(middle, keep="start"),
        ]
        request = GenerationRequest(segments=segments, single_line=True, max_tokens=16, heal_last_token=heal, stop=["<|endoftext|>"])
        return backend.generate(request, lambda *_: None)

    healed = run("    retu", True)
    assert healed.text.startswith("rn "), healed
    assert healed.prompt_tokens < run("    retu", False).prompt_tokens  # the word's tokens were taken back
    # Indentation alone: the model writes the statement without a space of its own in front.
    indented = run("    ", True)
    assert indented.text[:1].isalpha(), indented
