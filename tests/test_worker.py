"""The model worker process with the scripted backend: generation, cancellation, crashes, load failures."""

import asyncio
import os
import signal
import time

from lsp_server.engine.client import BACKOFF, FAILED, READY, WorkerClient, WorkerConfig
from lsp_server.engine.protocol import GenerationRequest
from lsp_server.prompts import Segment


def request(**kw) -> GenerationRequest:
    base = dict(segments=[Segment("<|fim_prefix|>", True), Segment("x = "), Segment("<|fim_middle|>", True)], max_tokens=200, single_line=False, max_lines=50)
    base.update(kw)
    return GenerationRequest(**base)


async def started(fake: dict, **config) -> WorkerClient:
    client = WorkerClient(WorkerConfig(backend="fake", fake=fake, restart_backoff_initial_s=0.2, **config))
    client.start()
    assert await client.wait_ready(20)
    return client


async def test_generates_the_scripted_text():
    client = await started({"outputs": ["answer = 42"]})
    try:
        result = await client.submit(request(single_line=True)).future
        assert result.text == "answer = 42" and result.finish == "eog"
        assert result.prompt_tokens > 0
    finally:
        await client.stop()


async def test_cancel_stops_within_about_one_token():
    token_ms = 20
    client = await started({"outputs": [" ".join(["tok"] * 400)], "token_delay_ms": token_ms})
    try:
        job = client.submit(request())
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        client.cancel(job)
        result = await job.future
        stopped_ms = (time.monotonic() - t0) * 1000
        assert result.finish == "cancelled"
        assert stopped_ms < 3 * token_ms + 30, stopped_ms
        assert 0 < result.generated_tokens < 400
    finally:
        await client.stop()


async def test_a_newer_job_supersedes_the_waiting_one_in_the_worker():
    client = await started({"outputs": ["a b c d e f g h"], "token_delay_ms": 30})
    try:
        first = client.submit(request())
        second = client.submit(request())
        third = client.submit(request())
        results = await asyncio.gather(first.future, second.future, third.future)
        assert results[0].finish == "cancelled"  # stopped because a newer job waits
        assert results[1].finish == "cancelled"  # dropped while waiting, or stopped at its first token
        assert results[2].text == "a b c d e f g h"
    finally:
        await client.stop()


async def test_killed_worker_answers_the_job_and_restarts_with_backoff():
    states = []
    client = WorkerClient(
        WorkerConfig(backend="fake", fake={"outputs": ["slow " * 200], "token_delay_ms": 20}, restart_backoff_initial_s=0.3),
        on_state=lambda state, detail: states.append(state),
    )
    client.start()
    assert await client.wait_ready(20)
    first_pid = client.pid
    try:
        job = client.submit(request())
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        result = await asyncio.wait_for(job.future, 2)
        assert result.finish == "crashed" and time.monotonic() - t0 < 1.0
        assert client.state == BACKOFF
        assert (await client.submit(request()).future).finish == "not_ready"
        assert await client.wait_ready(10)
        assert client.pid != first_pid and BACKOFF in states
        assert (await client.submit(request(single_line=True, max_tokens=3)).future).text
    finally:
        await client.stop()


async def test_failed_load_is_reported_once_and_not_retried():
    states = []
    client = WorkerClient(WorkerConfig(backend="fake", fake={"load_error": "bad magic"}), on_state=lambda s, d: states.append((s, d)))
    client.start()
    assert not await client.wait_ready(20)
    assert client.state == FAILED and "bad magic" in client.detail
    await asyncio.sleep(0.5)
    assert [s for s, _ in states].count("loading") == 1  # no retry loop
    await client.stop()


async def test_llama_backend_on_a_missing_file_fails_cleanly(tmp_path):
    client = WorkerClient(WorkerConfig(backend="llama", model_path=str(tmp_path / "missing.gguf")))
    client.start()
    assert not await client.wait_ready(60)
    assert client.state == FAILED and client.detail
    await client.stop()


async def test_garbage_model_file_fails_cleanly(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    client = WorkerClient(WorkerConfig(backend="llama", model_path=str(bad)))
    client.start()
    assert not await client.wait_ready(60)
    assert client.state == FAILED
    await client.stop()


async def test_stop_reaps_the_worker():
    client = await started({})
    pid = client.pid
    await client.stop()
    assert client.state == "stopped"
    await asyncio.sleep(0.1)
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_decode_budget_ends_a_block_at_its_next_line_end():
    from lsp_server.engine.generation import TextAccumulator
    from lsp_server.engine.protocol import GenerationRequest

    acc = TextAccumulator(GenerationRequest(segments=[], single_line=False, max_lines=12, decode_budget_s=1.0))
    assert not acc.feed("a = 1\n    b", over_budget=False)
    assert not acc.feed(" = 2", over_budget=True)  # no line end since the budget ran out: go on
    assert acc.feed("\n    c", over_budget=True)
    assert acc.text == "a = 1\n    b = 2" and acc.finish == "budget"
    single = TextAccumulator(GenerationRequest(segments=[], single_line=True))
    assert not single.feed("x +", over_budget=True)  # single-line suggestions end at their line end anyway


async def test_an_action_yields_to_a_completion_and_resumes_where_it_was():
    words = " ".join(f"w{i}" for i in range(60))
    client = await started({"outputs": ["done"], "action_outputs": [words], "token_delay_ms": 10})
    try:
        action = client.submit(request(lane="action", line_rules=False, max_tokens=500))
        await asyncio.sleep(0.3)  # the action is generating
        t0 = time.monotonic()
        completion = client.submit(request(single_line=True))
        result = await completion.future
        completion_ms = (time.monotonic() - t0) * 1000
        assert result.text == "done" and result.finish == "eog"
        assert not action.future.done()  # it stepped aside, it was not cancelled
        assert completion_ms < 300, completion_ms  # about one action token, then the completion's own
        explained = await action.future
        assert explained.text == words and explained.finish == "eog"  # nothing lost or repeated
        assert client.max_in_flight == 1  # completions in flight, the action not counted
    finally:
        await client.stop()


async def test_actions_queue_in_order_and_a_queued_one_can_be_cancelled():
    client = await started({"action_outputs": ["first answer", "second answer", "third answer"], "token_delay_ms": 20})
    try:
        jobs = [client.submit(request(lane="action", line_rules=False)) for _ in range(3)]
        client.cancel(jobs[1])
        results = await asyncio.gather(*(j.future for j in jobs))
        assert [r.finish for r in results] == ["eog", "cancelled", "eog"]
        assert results[0].text == "first answer" and results[2].text == "second answer"  # the scripted turn
    finally:
        await client.stop()
