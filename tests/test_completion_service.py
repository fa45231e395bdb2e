"""CompletionService scheduling with an in-process engine whose jobs the test finishes by hand."""

import asyncio

import pytest

from lsp_server.completion import CompletionService
from lsp_server.config import Settings
from lsp_server.context import Snapshot
from lsp_server.engine.client import READY, Job
from lsp_server.engine.protocol import GenerationResult

FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"]


class ManualEngine:
    def __init__(self) -> None:
        self.state = READY
        self.detail = ""
        self.info = {"name": "manual", "architecture": "qwen2", "special_tokens": FIM_TOKENS}
        self.jobs: list[Job] = []
        self.cancelled: list[int] = []
        self.followed: list[tuple[int, str]] = []
        self.running = 0
        self.max_running = 0

    def submit(self, request):
        loop = asyncio.get_running_loop()
        job = Job(len(self.jobs) + 1, loop.create_future(), loop.create_future())
        job.request = request
        self.jobs.append(job)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        job.future.add_done_callback(lambda _: self._done())
        return job

    def _done(self):
        self.running -= 1

    def cancel(self, job):
        self.cancelled.append(job.id)

    def follow(self, job, typed):
        self.followed.append((job.id, typed))

    def partial(self, index: int, text: str):
        self.jobs[index].partial.set_result(text)

    def finish(self, index: int, text: str = "", finish: str = "stop"):
        self.jobs[index].future.set_result(GenerationResult(text=text, finish=finish, prompt_tokens=10, generated_tokens=3))


async def until(condition, timeout_s: float = 2.0):
    """Let the service run (it parses off the event loop) until `condition()` holds."""
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def snap(text="x = |\n", version=1):
    offset = text.index("|")
    return Snapshot("file:///t.py", version, text.replace("|", ""), offset, "python")


async def test_one_request_gets_the_model_text():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    task = asyncio.create_task(service.complete(snap()))
    await until(lambda: len(engine.jobs) == 1)
    req = engine.jobs[0].request
    special = [s.text for s in req.segments if s.special]
    assert special == ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]  # no other files: plain FIM
    assert req.single_line and req.max_tokens == Settings().completion.max_tokens_single_line
    engine.finish(0, "42")
    result = await task
    assert result.text == "42" and result.reason == "ok"


async def test_newer_request_supersedes_waiting_and_running_ones_at_once():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    first = asyncio.create_task(service.complete(snap(version=1)))
    await until(lambda: len(engine.jobs) == 1)
    second = asyncio.create_task(service.complete(snap(version=2)))
    await until(lambda: service._waiting is not None)
    third = asyncio.create_task(service.complete(snap(version=3)))
    await until(lambda: second.done())
    # The first was running: it is answered now and its generation told to stop; the second never started.
    assert (await first).reason.startswith("superseded")
    assert (await second).reason.startswith("superseded")
    assert engine.cancelled == [1]
    assert len(engine.jobs) == 1 and engine.max_running == 1
    engine.finish(0, "", "cancelled")  # the worker confirms the stop; only then does the newest start
    await until(lambda: len(engine.jobs) == 2)
    engine.finish(1, "7")
    assert (await third).text == "7"
    assert engine.max_running == 1


async def test_client_cancellation_stops_the_generation():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    task = asyncio.create_task(service.complete(snap()))
    await until(lambda: len(engine.jobs) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # A single-line generation gets a moment (completion.follow_typing) for the next keystroke's request to
    # follow it; with none coming, it is stopped.
    await until(lambda: engine.cancelled == [1], timeout_s=1.0)


async def test_not_ready_and_crashed_engines_give_empty_answers():
    engine = ManualEngine()
    engine.state = "loading"
    service = CompletionService(engine, Settings())
    assert (await service.complete(snap())).reason == "model loading"
    engine.state = READY
    task = asyncio.create_task(service.complete(snap()))
    await until(lambda: len(engine.jobs) == 1)
    engine.finish(0, "", "crashed")
    result = await task
    assert result.text == "" and "crashed" in result.reason


async def test_unknown_model_family_gives_a_reason_not_an_error():
    engine = ManualEngine()
    engine.info = {"name": "chat-only", "architecture": "llama", "special_tokens": []}
    result = await CompletionService(engine, Settings()).complete(snap())
    assert result.text == "" and "FIM" in result.reason and not engine.jobs


async def test_family_from_settings_overrides_detection():
    engine = ManualEngine()
    settings = Settings()
    settings.model.family = "starcoder2"
    task = asyncio.create_task(CompletionService(engine, settings).complete(snap()))
    await until(lambda: len(engine.jobs) == 1)
    assert "<fim_prefix>" in "".join(s.text for s in engine.jobs[0].request.segments if s.special)
    engine.finish(0, "1")
    assert (await task).text == "1"


def test_adaptive_debounce_follows_the_typing_rhythm_and_the_model_speed():
    service = CompletionService(ManualEngine(), Settings())
    assert service.debounce_s() == 0.0  # nothing known yet
    for i in range(5):
        service._note_keystroke(10.0 + 0.12 * i)  # typing every 120 ms
    service._model_latency_s = 2.0  # a CPU model: slower than the typist
    assert service.debounce_s() == pytest.approx(1.3 * 0.12)
    service._model_latency_s = 0.05  # a GPU model: answers before the next key
    assert service.debounce_s() == 0.0
    service._note_keystroke(30.0)  # a pause is not part of the rhythm
    assert max(service._keystroke_intervals_s) < 1.0
    service.settings.completion.debounce_ms = 40
    assert service.debounce_s() == 0.04


async def test_keystrokes_inside_the_debounce_start_no_generation():
    engine = ManualEngine()
    settings = Settings()
    settings.completion.debounce_ms = 150
    service = CompletionService(engine, settings)
    tasks = []
    for version in range(1, 6):
        tasks.append(asyncio.create_task(service.complete(snap(f"x = {'1' * version}|\n", version))))
        await asyncio.sleep(0.03)
    await until(lambda: len(engine.jobs) == 1, timeout_s=3)
    engine.finish(0, " + 2")
    results = await asyncio.gather(*tasks)
    assert [r.reason for r in results[:-1]] == ["superseded by a newer request"] * 4
    assert results[-1].text == " + 2" and len(engine.jobs) == 1


async def test_a_blank_line_asks_for_at_least_one_token_and_code_on_the_line_does_not():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    cases = [("def f():\n    |\n", 1), ("def f():\n    return |\n", 0), ("x = 1\n|\n", 1), ("x = f(|)\n", 0)]
    for i, (text, expected) in enumerate(cases):
        task = asyncio.create_task(service.complete(snap(text, version=i + 1)))
        await until(lambda: len(engine.jobs) == i + 1)
        assert engine.jobs[i].request.min_tokens == expected, text
        engine.finish(i, "pass")
        await task


async def test_with_cursor_line_in_middle_typing_on_a_line_keeps_prefix_and_suffix_unchanged():
    settings = Settings()
    settings.completion.cursor_line_in_middle = True
    engine = ManualEngine()
    service = CompletionService(engine, settings)
    texts = ["def add(a, b):\n    ret|\n\nprint(add(1, 2))\n", "def add(a, b):\n    retu|\n\nprint(add(1, 2))\n"]
    for i, text in enumerate(texts):
        task = asyncio.create_task(service.complete(snap(text, version=i + 1)))
        await until(lambda: len(engine.jobs) == i + 1)
        engine.finish(i, "rn a + b")
        await task
    first, second = (job.request.segments for job in engine.jobs)
    assert [s.text for s in first][-2:] == ["<|fim_middle|>", "    ret"]
    assert [s.text for s in second][-1] == "    retu"
    # Everything before the middle (the prefix ends at the line start, the suffix) is the same text.
    assert [s.text for s in first][:-1] == [s.text for s in second][:-1]
    assert any(s.text.endswith("def add(a, b):\n") for s in first if not s.special)


async def test_without_cursor_line_in_middle_the_line_ends_the_prefix():
    settings = Settings()
    settings.completion.cursor_line_in_middle = False
    engine = ManualEngine()
    service = CompletionService(engine, settings)
    task = asyncio.create_task(service.complete(snap("def add(a, b):\n    ret|\n", version=1)))
    await until(lambda: len(engine.jobs) == 1)
    engine.finish(0, "urn a + b")
    await task
    texts = [s.text for s in engine.jobs[0].request.segments]
    assert texts[-1] == "<|fim_middle|>" and any(t.endswith("    ret") for t in texts)



async def test_typing_what_the_running_generation_writes_follows_it_instead_of_starting_another():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    first = asyncio.create_task(service.complete(snap("total = |\n", version=1)))
    await until(lambda: len(engine.jobs) == 1)
    first.cancel()  # the editor cancels the shown request before it sends the next keystroke's
    second = asyncio.create_task(service.complete(snap("total = c|\n", version=2)))
    third = asyncio.create_task(service.complete(snap("total = co|\n", version=3)))
    await until(lambda: second.done())
    assert (await second).reason.startswith("superseded")
    await asyncio.sleep(0.4)  # past the grace period: the generation is being followed, so it runs on
    assert engine.cancelled == [] and len(engine.jobs) == 1
    engine.finish(0, "count(items)")
    result = await third
    assert (result.text, result.cache) == ("unt(items)", "followed")
    assert len(engine.jobs) == 1 and service.cache_report()["followed"] == 1


async def test_typing_something_else_than_the_running_generation_writes_starts_a_new_one():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    first = asyncio.create_task(service.complete(snap("total = |\n", version=1)))
    await until(lambda: len(engine.jobs) == 1)
    second = asyncio.create_task(service.complete(snap("total = s|\n", version=2)))
    await until(lambda: first.done())
    engine.finish(0, "count(items)")  # it wrote "c...", the user typed "s"
    await until(lambda: len(engine.jobs) == 2)
    engine.finish(1, "um(items)")
    assert (await second).text == "um(items)"
    # Deleting or moving is not typing: the running generation is stopped at once.
    third = asyncio.create_task(service.complete(snap("total = |\n", version=3)))
    await until(lambda: len(engine.jobs) == 3)
    fourth = asyncio.create_task(service.complete(snap("total |\n", version=4)))
    await until(lambda: engine.cancelled == [3])
    engine.finish(2, "", "cancelled")
    await until(lambda: len(engine.jobs) == 4)
    engine.finish(3, "y")
    await third
    await fourth


async def test_a_block_generation_is_not_followed():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    first = asyncio.create_task(service.complete(snap("def f():\n    |\n", version=1)))
    await until(lambda: len(engine.jobs) == 1)
    assert not engine.jobs[0].request.single_line
    second = asyncio.create_task(service.complete(snap("def f():\n    r|\n", version=2)))
    await until(lambda: engine.cancelled == [1])
    engine.finish(0, "", "cancelled")
    await until(lambda: len(engine.jobs) == 2)
    engine.finish(1, "eturn 1")
    assert (await second).text == "eturn 1"
    await first



async def test_a_block_shows_its_first_line_first_and_the_rest_follows_typing_it():
    engine = ManualEngine()
    service = CompletionService(engine, Settings())
    base = "def f(a):\n    |\n"
    first = asyncio.create_task(service.complete(snap(base, version=1)))
    await until(lambda: len(engine.jobs) == 1)
    assert engine.jobs[0].request.first_line_first
    engine.partial(0, "b = a + 1")
    answer = await first
    assert (answer.text, answer.cache) == ("b = a + 1", "first-line")
    assert engine.cancelled == []  # the rest is still being written
    # Typing the shown line is type-through and leaves the generation running.
    typed = await service.complete(snap("def f(a):\n    b = a|\n", version=2))
    assert (typed.text, typed.cache) == (" + 1", "type-through") and engine.cancelled == []
    # Enter after the line: that request follows the generation and gets the next line when it is done.
    after_enter = asyncio.create_task(service.complete(snap("def f(a):\n    b = a + 1\n    |\n", version=3)))
    await until(lambda: len(engine.followed) == 1)
    assert engine.followed[0] == (1, "b = a + 1\n    ")
    engine.finish(0, "b = a + 1\n    return b")
    rest = await after_enter
    assert (rest.text, rest.cache) == ("return b", "followed")
    assert len(engine.jobs) == 1 and engine.cancelled == []

