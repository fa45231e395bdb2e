"""The model worker process: `python -m lsp_server.engine.worker --fd-in N --fd-out M --config JSON`.

One generation at a time. A reader thread takes messages off the pipe while the main thread generates,
so a cancel (or a newer job, which supersedes the waiting one) is seen within one token. When the
server goes away (end of the pipe, or the parent dies) the worker exits.

Two lanes: completions (latest wins: a newer one supersedes the waiting or running one) and actions
(explain, refactor: queued in order). Completions come first: a running action yields between tokens
when a completion arrives, and resumes after it from where it was (the backend parks its model state).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque

from .protocol import GenerationRequest, GenerationResult, read_frame, write_frame

log = logging.getLogger("offpilot.worker")

TICK_S = 0.25
"""Most time between two progress messages while a generation advances."""


class _Jobs:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: tuple[int, GenerationRequest] | None = None
        """The newest completion not yet started."""
        self.actions: deque[tuple[int, GenerationRequest]] = deque()
        """Actions not yet started or yielded, oldest first."""
        self.running_id: int | None = None
        self.cancelled: set[int] = set()
        self.typed: dict[int, str] = {}
        """Per running completion: what the user typed at its cursor since it started (op "follow")."""
        self.closed = False


def first_line(text: str) -> str | None:
    """The text up to the line end that follows its first non-blank content, once that line end is written."""
    end = text.find("\n")
    while end >= 0 and not text[:end].strip():
        end = text.find("\n", end + 1)
    return text[:end] if end >= 0 else None


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _reader(fd_in: int, fd_out: int, jobs: _Jobs, send) -> None:
    while True:
        try:
            msg = read_frame(fd_in)
        except (OSError, ValueError):
            msg = None
        if msg is None or msg.get("op") == "shutdown":
            with jobs.cond:
                jobs.closed = True
                jobs.cond.notify_all()
            if jobs.running_id is None:
                os._exit(0)
            return
        op = msg.get("op")
        if op == "generate":
            job = (int(msg["id"]), GenerationRequest.from_dict(msg["request"]))
            superseded = None
            with jobs.cond:
                if job[1].lane == "completion":
                    superseded = jobs.waiting
                    jobs.waiting = job
                else:
                    jobs.actions.append(job)
                jobs.cond.notify_all()
            if superseded is not None:
                send({"ev": "done", "id": superseded[0], "result": {"finish": "cancelled"}})
        elif op == "follow":
            jobs.typed[int(msg["id"])] = str(msg.get("typed", ""))
        elif op == "cancel":
            job_id = int(msg["id"])
            with jobs.cond:
                queued = [a for a in jobs.actions if a[0] == job_id]
                if jobs.waiting is not None and jobs.waiting[0] == job_id:
                    jobs.waiting = None
                    dropped = True
                elif queued:
                    jobs.actions.remove(queued[0])
                    dropped = True
                else:
                    dropped = False
                    jobs.cancelled.add(job_id)
            if dropped:
                send({"ev": "done", "id": job_id, "result": {"finish": "cancelled"}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd-in", type=int, required=True)
    parser.add_argument("--fd-out", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s worker %(levelname)s %(message)s")
    config = json.loads(args.config)
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        with send_lock:
            try:
                write_frame(args.fd_out, message)
            except OSError:
                os._exit(0)  # the server is gone

    send({"ev": "loading", "pid": os.getpid()})
    try:
        from .backends import make_backend

        backend = make_backend(config, on_plan=lambda plan: send({"ev": "plan", "plan": plan}))
        info = backend.info(list(config.get("probe_tokens", [])))
    except Exception as exc:  # a bad model file must be reported, not crash silently
        log.error("model load failed: %s", exc)
        send({"ev": "load_failed", "error": f"{type(exc).__name__}: {exc}"})
        return 3
    send({"ev": "ready", "info": info})

    jobs = _Jobs()
    threading.Thread(target=_reader, args=(args.fd_in, args.fd_out, jobs, send), daemon=True).start()
    while True:
        with jobs.cond:
            while jobs.waiting is None and not jobs.actions and not jobs.closed:
                jobs.cond.wait()
            if jobs.closed:
                return 0
            if jobs.waiting is not None:
                job_id, request = jobs.waiting
                jobs.waiting = None
            else:
                job_id, request = jobs.actions.popleft()
            jobs.running_id = job_id

        last_tick = [time.monotonic()]

        first_line_sent = [not request.first_line_first]

        def should_stop(text: str = "", job_id: int = job_id, lane: str = request.lane) -> str | None:
            # Called between tokens and prefill chunks: the server's hang watchdog hears from us at least
            # every TICK_S while generation makes progress, and nothing when it is stuck (in C or not).
            now = time.monotonic()
            if now - last_tick[0] >= TICK_S:
                last_tick[0] = now
                send({"ev": "tick", "id": job_id})
            if text:  # between tokens: the text so far
                if not first_line_sent[0] and (line := first_line(text)) is not None:
                    first_line_sent[0] = True
                    send({"ev": "partial", "id": job_id, "text": line})
                typed = jobs.typed.get(job_id)
                if typed and not (text.startswith(typed) or typed.startswith(text)):
                    return "diverged"  # the user typed something else than this text: no one waits for it
            if job_id in jobs.cancelled or jobs.closed:
                return "cancelled"
            if jobs.waiting is not None:
                # A newer completion supersedes this one; an action steps aside for it.
                return "cancelled" if lane == "completion" else "yield"
            return None

        try:
            result = backend.generate(request, should_stop)
        except Exception as exc:
            log.error("generation failed: %s", traceback.format_exc())
            result = GenerationResult(finish="error", error=f"{type(exc).__name__}: {exc}")
        if result.finish == "yielded":
            request.resume_tokens, request.resume_text = result.tokens, result.text
            with jobs.cond:
                jobs.actions.appendleft((job_id, request))  # first in line once the completion is done
                jobs.running_id = None
            continue
        with jobs.cond:
            jobs.running_id = None
            jobs.cancelled.discard(job_id)
            jobs.typed.pop(job_id, None)
        result.tokens = []
        send({"ev": "done", "id": job_id, "result": result.__dict__})


if __name__ == "__main__":
    sys.exit(main())
