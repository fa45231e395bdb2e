"""Real llama.cpp through the whole server: the tiny generated GGUF, and the small default model."""

from __future__ import annotations

import os
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
        return backend.generate(request, lambda: None)

    free = run(0)
    assert free.finish == "eog", free  # this spot is complete: the model ends early on its own
    held = run(free.generated_tokens)  # the end token it chose last time is now forbidden
    assert held.generated_tokens > free.generated_tokens, (free, held)
