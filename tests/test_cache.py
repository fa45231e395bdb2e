"""The response cache (memory and disk) and type-through, at the module and the service level."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import sqlite3
import stat

import pytest

from lsp_server.cache import CompletionCache, cache_key, model_fingerprint
from lsp_server.completion import CompletionService, Shown
from lsp_server.config import Settings
from lsp_server.context import Snapshot
from lsp_server.engine.protocol import GenerationResult

from test_completion_service import ManualEngine, until


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_memory_layer_is_lru():
    cache = CompletionCache(memory_entries=2)
    cache.put("a", {"text": "1"})
    cache.put("b", {"text": "2"})
    assert cache.get("a") == {"text": "1"}
    cache.put("c", {"text": "3"})  # "b" was used least recently
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.stats.memory_hits == 3 and cache.stats.misses == 1


def test_disk_layer_survives_a_restart_in_a_private_folder(tmp_path):
    folder = tmp_path / "c"
    first = CompletionCache(directory=folder)
    first.put("k", {"text": "return 42", "finish": "eog"})
    first.close()
    second = CompletionCache(directory=folder)
    assert second.get("k") == {"text": "return 42", "finish": "eog"} and second.last_layer == "disk"
    assert second.get("k") and second.last_layer == "memory"
    assert _mode(folder) == 0o700
    files = [p for p in folder.iterdir() if p.is_file()]
    assert files and all(_mode(p) == 0o600 for p in files)


def test_a_corrupted_database_is_rebuilt_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "c"
    cache = CompletionCache(directory=folder)
    cache.put("k", {"text": "x"})
    cache.close()
    (folder / "cache.db").write_bytes(b"this is not sqlite" * 100)
    caplog.set_level(logging.WARNING, logger="offpilot.cache")
    rebuilt = CompletionCache(directory=folder)
    assert rebuilt.get("k") is None  # a miss, not an error
    rebuilt.put("k2", {"text": "y"})
    rebuilt.close()
    assert CompletionCache(directory=folder).get("k2") == {"text": "y"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupted" in warnings[0].getMessage()


def test_a_pickled_row_is_never_unpickled(tmp_path):
    folder = tmp_path / "c"
    cache = CompletionCache(directory=folder)
    cache.put("k", {"text": "x"})
    cache.close()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    con = sqlite3.connect(folder / "cache.db")
    con.execute("UPDATE Cache SET mode = 4, value = ? WHERE key = 'k'", (pickle.dumps(Payload()),))
    con.commit()
    con.close()
    reopened = CompletionCache(directory=folder)
    assert reopened.get("k") is None
    assert not marker.exists()


def test_an_unusable_folder_leaves_the_memory_layer_working(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    caplog.set_level(logging.WARNING, logger="offpilot.cache")
    cache = CompletionCache(directory=blocker / "c")
    assert cache.disk_error
    cache.put("k", {"text": "x"})
    assert cache.get("k") == {"text": "x"}
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_values_that_are_not_short_text_are_refused(tmp_path):
    cache = CompletionCache(directory=tmp_path / "c", memory_entries=0)
    cache.put("big", {"text": "x" * 100_000})
    assert cache.get("big") is None


def test_model_fingerprint_uses_the_sidecar_or_the_content(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"a" * 5000)
    first = model_fingerprint(model)
    model.write_bytes(b"b" * 5000)
    assert model_fingerprint(model) != first
    (tmp_path / "m.gguf.sha256").write_text("ab" * 32 + "  m.gguf\n")
    assert model_fingerprint(model) == "sha256:" + "ab" * 32
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})


def test_type_through_needs_the_typed_text_to_start_the_suggestion():
    shown = Shown("file:///t.py", "x = \nend", 4, "compute(1)")
    typed = Snapshot("file:///t.py", 2, "x = comp\nend", 8, "python")
    assert shown.rest_after_typing(typed) == "ute(1)"
    other = Snapshot("file:///t.py", 2, "x = conf\nend", 8, "python")
    assert shown.rest_after_typing(other) == ""
    elsewhere = Snapshot("file:///t.py", 2, "y = comp\nend", 8, "python")  # same length, other change
    assert shown.rest_after_typing(elsewhere) == ""
    everything = Snapshot("file:///t.py", 2, "x = compute(1)\nend", 14, "python")
    assert shown.rest_after_typing(everything) == ""
    assert shown.rest_after_typing(Snapshot("file:///u.py", 2, "x = comp\nend", 8, "python")) == ""


def _cached_service(tmp_path, fingerprint: str = "test-model", enabled: bool = True):
    """A service over a hand-driven engine whose model has `fingerprint`, caching under tmp_path."""
    engine = ManualEngine()
    engine.info = {**engine.info, "fingerprint": fingerprint}
    settings = Settings()
    settings.cache.enabled = enabled
    settings.cache.directory = str(tmp_path / "c")
    return engine, settings, CompletionService(engine, settings)


def _snap(text: str, version: int = 1) -> Snapshot:
    return Snapshot("file:///t.py", version, text.replace("|", ""), text.index("|"), "python")


async def test_service_serves_repeats_and_type_through_without_the_model(tmp_path):
    engine, settings, service = _cached_service(tmp_path)
    doc = "def area(r):\n    return |\n"
    task = asyncio.create_task(service.complete(_snap(doc)))
    await until(lambda: len(engine.jobs) == 1)
    engine.finish(0, "3.14159 * r * r", "eog")
    first = await task
    assert first.text == "3.14159 * r * r" and first.cache == "miss"

    typed = await service.complete(_snap("def area(r):\n    return 3.1|\n", 2))
    assert typed.text == "4159 * r * r" and typed.cache == "type-through"
    back = await service.complete(_snap(doc, 3))  # deleted what was typed: the exact prompt again
    assert back.text == "3.14159 * r * r" and back.cache == "memory"
    assert len(engine.jobs) == 1  # the model ran once

    restarted = CompletionService(engine, settings)  # a new server process: the disk layer answers
    again = await restarted.complete(_snap(doc, 4))
    assert again.text == "3.14159 * r * r" and again.cache == "disk" and len(engine.jobs) == 1


async def test_no_caching_without_a_fingerprint_or_when_disabled(tmp_path):
    for fingerprint, enabled in (("", True), ("test-model", False)):
        engine, settings, service = _cached_service(tmp_path, fingerprint, enabled)
        for i in range(2):
            task = asyncio.create_task(service.complete(_snap("x = |\n", i)))
            await until(lambda i=i: len(engine.jobs) == i + 1)
            engine.finish(i, "1", "eog")
            assert (await task).cache == "miss"


@pytest.mark.parametrize("finish", ["cancelled", "error", "timeout"])
async def test_unfinished_answers_are_not_cached(tmp_path, finish):
    engine, settings, service = _cached_service(tmp_path)
    for i in range(2):
        task = asyncio.create_task(service.complete(_snap("x = |\n", i)))
        await until(lambda i=i: len(engine.jobs) == i + 1)
        engine.finish(i, "1", finish)
        await task
    assert len(engine.jobs) == 2


async def test_prefetch_fills_the_cache_for_the_next_line_and_yields_to_real_requests(tmp_path):
    engine, settings, service = _cached_service(tmp_path)
    head = "def area(r):\n    "
    task = asyncio.create_task(service.complete(_snap(head + "|\n")))
    await until(lambda: len(engine.jobs) == 1)
    engine.finish(0, "pi = 3.14159", "eog")
    assert (await task).text == "pi = 3.14159"
    # idle model: the state after typing that line and Enter is worked out in the background
    await until(lambda: len(engine.jobs) == 2)
    segments = "".join(s.text for s in engine.jobs[1].request.segments if not s.special)
    assert "pi = 3.14159\n    " in segments
    engine.finish(1, "return pi * r * r", "eog")
    await until(lambda: service.prefetches["stored"] == 1)
    after_enter = await service.complete(_snap(head + "pi = 3.14159\n    |\n", 2))
    assert after_enter.text == "return pi * r * r" and after_enter.cache == "memory" and len(engine.jobs) == 2

    # the next prefetch is running when the user types something else: it is cancelled at once
    await until(lambda: len(engine.jobs) == 3)
    prefetch_job = engine.jobs[2]
    other = asyncio.create_task(service.complete(_snap(head + "pi = 3.14159\n    x|\n", 3)))
    await until(lambda: prefetch_job.id in engine.cancelled)
    prefetch_job.future.set_result(GenerationResult(finish="cancelled"))
    await until(lambda: len(engine.jobs) == 4)
    engine.finish(3, " = 1", "eog")
    assert (await other).text == " = 1"


def test_state_after_first_line_indents_like_an_editor():
    from lsp_server.completion import state_after_first_line
    from lsp_server.context import build_context

    settings = Settings().completion
    snap = _snap("def f(xs):\n    |\n")
    ctx = build_context(snap, settings)
    opened = state_after_first_line(snap, "for x in xs:", ctx)
    assert opened.text == "def f(xs):\n    for x in xs:\n        \n" and opened.offset == len("def f(xs):\n    for x in xs:\n        ")
    block = state_after_first_line(snap, "total = 0\n    for x in xs:", ctx)
    assert block.text == "def f(xs):\n    total = 0\n    \n"
    right = _snap("print(|)\n")
    assert state_after_first_line(right, "x", build_context(right, settings)) is None
