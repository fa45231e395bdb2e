"""The server's side of the model worker: spawn, talk, cancel, restart with back-off.

The event loop never waits on the model: a reader thread turns worker messages into loop callbacks, and
every submitted job gets its future resolved exactly once (done, cancelled, or crashed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .protocol import GenerationRequest, GenerationResult, read_frame, write_frame

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

STOPPED, LOADING, READY, FAILED, BACKOFF, DISABLED = "stopped", "loading", "ready", "failed", "backoff", "disabled"

OOM_SIGNS = ("failed to create llama_context", "out of memory", "failed to allocate", "cudamalloc",
             "failed to load model from file")
"""Load errors that, with GPU layers in the plan, mean the model did not fit (llama-cpp-python says only
"Failed to load model from file" when the weights' buffer cannot be allocated; a file the header reader
rejected never gets a GPU plan, so a bad file is not mistaken for this)."""


class RestartPolicy:
    """When to restart a crashed worker: back-off doubling from `initial_s` up to `max_s` over consecutive
    crashes (a worker that stayed up `stable_s` ends the series), and a circuit breaker that gives up after
    `breaker_crashes` crashes within `window_s`."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, breaker_crashes: int = 3, window_s: float = 60.0,
                 stable_s: float = 60.0) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.breaker_crashes, self.window_s, self.stable_s = breaker_crashes, window_s, stable_s
        self.crashes: list[float] = []
        self.consecutive = 0

    def on_crash(self, now: float, up_since: float | None) -> float | None:
        """The delay before the next start, or None when the breaker trips."""
        self.crashes = [t for t in self.crashes if now - t < self.window_s] + [now]
        if self.breaker_crashes > 0 and len(self.crashes) >= self.breaker_crashes:
            return None
        if up_since is not None and now - up_since >= self.stable_s:
            self.consecutive = 0
        self.consecutive += 1
        return min(self.max_s, self.initial_s * (2 ** (self.consecutive - 1)))

    def reset(self) -> None:
        self.crashes.clear()
        self.consecutive = 0


@dataclass
class WorkerConfig:
    backend: str = "llama"
    model_path: str = ""
    n_ctx: int = 0
    n_threads: int = 0
    n_gpu_layers: int = -1
    vram_budget_mb: int = 0
    prefill_chunk_tokens: int = 128
    action_prefill_chunk_tokens: int = 16
    reuse_kv_cache: bool = True
    probe_tokens: list[str] = field(default_factory=list)
    fake: dict = field(default_factory=dict)
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    breaker_crashes: int = 3
    """Crashes within breaker_window_s that turn the model off until a settings change or a restart command."""
    breaker_window_s: float = 60.0
    hang_timeout_s: float = 10.0
    """A job that hears nothing from the worker for this long: the worker hangs, it is killed (0: never)."""
    gpu_oom_retry: bool = True
    """A load that runs out of GPU memory is retried with half the GPU layers, down to none."""
    load_timeout_s: float = 300.0
    """A load that takes longer is a failed load (the worker is killed)."""

    @staticmethod
    def from_settings(settings: "Settings", probe_tokens: list[str], model_path: str = "") -> "WorkerConfig":
        m = settings.model
        return WorkerConfig(
            model_path=model_path, n_ctx=m.n_ctx, n_threads=m.n_threads, n_gpu_layers=m.n_gpu_layers,
            vram_budget_mb=m.vram_budget_mb, prefill_chunk_tokens=m.prefill_chunk_tokens, probe_tokens=probe_tokens,
            action_prefill_chunk_tokens=m.action_prefill_chunk_tokens,
            reuse_kv_cache=m.reuse_kv_cache,
            restart_backoff_initial_s=settings.worker.restart_backoff_initial_s,
            restart_backoff_max_s=settings.worker.restart_backoff_max_s,
            hang_timeout_s=settings.worker.hang_timeout_s,
            load_timeout_s=settings.worker.load_timeout_s,
            gpu_oom_retry=settings.model.gpu_oom_retry,
        )


@dataclass
class Job:
    id: int
    future: asyncio.Future
    partial: asyncio.Future | None = None
    """Resolved with the first line when the request asked for it first (GenerationRequest.first_line_first)."""


class WorkerClient:
    """One model worker process; `submit` jobs, `cancel` them, watch `state`."""

    def __init__(self, config: WorkerConfig, on_state: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.state = STOPPED
        self.detail = ""
        self.info: dict = {}
        self.pid: int | None = None
        self._on_state = on_state
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._proc: subprocess.Popen | None = None
        self._fd_to_worker: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.policy = RestartPolicy()
        self.starts = 0
        """Worker processes started (loads, restarts after crashes, out-of-memory retries)."""
        self.crashes = 0
        self._ready_at: float | None = None
        self._load_error = ""
        self._load_plan: dict = {}
        self._hung = False
        self._last_progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._restart_handle: asyncio.TimerHandle | None = None
        self._ready_event: asyncio.Event | None = None
        self.generations_started = 0
        self.max_in_flight = 0
        """Most completions submitted to the worker and not yet finished at one time (the service keeps it at 1)."""
        self._lanes: dict[int, str] = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or start again, after `stop`) with the current config: crash history and back-off start over."""
        self._loop = asyncio.get_running_loop()
        self._ready_event = self._ready_event or asyncio.Event()
        self._closing = False
        if self._restart_handle:
            self._restart_handle.cancel()
            self._restart_handle = None
        old, self._proc = self._proc, None
        if old is not None and old.poll() is None:
            # Two starts in a row (a settings change while the first load was still being set up): one worker.
            old.kill()
        self._close_pipe_to_worker()
        self._answer_all("model worker restarted")  # jobs of a stopped worker whose exit was not seen yet
        self.policy = RestartPolicy(self.config.restart_backoff_initial_s, self.config.restart_backoff_max_s,
                                    self.config.breaker_crashes, self.config.breaker_window_s)
        self._spawn()

    def _close_pipe_to_worker(self) -> None:
        if self._fd_to_worker is not None:
            try:
                os.close(self._fd_to_worker)
            except OSError:
                pass
            self._fd_to_worker = None

    def fail(self, detail: str) -> None:
        """Mark the engine unusable without starting a worker (e.g. no model file to load)."""
        self._ready_event = self._ready_event or asyncio.Event()
        self._set_state(FAILED, detail)

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        if self._ready_event is not None:
            if state in (READY, FAILED, DISABLED):
                self._ready_event.set()
            else:
                self._ready_event.clear()
        if self._on_state:
            try:
                self._on_state(state, detail)
            except Exception:
                log.exception("state callback failed")

    def _spawn(self) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        config = {
            "backend": self.config.backend,
            "model_path": self.config.model_path,
            "n_ctx": self.config.n_ctx,
            "n_threads": self.config.n_threads,
            "n_gpu_layers": self.config.n_gpu_layers,
            "vram_budget_mb": self.config.vram_budget_mb,
            "prefill_chunk_tokens": self.config.prefill_chunk_tokens,
            "action_prefill_chunk_tokens": self.config.action_prefill_chunk_tokens,
            "reuse_kv_cache": self.config.reuse_kv_cache,
            "probe_tokens": self.config.probe_tokens,
            "hang_timeout_s": self.config.hang_timeout_s,
            "fake": self.config.fake,
        }
        cmd = [
            sys.executable, "-m", "lsp_server.engine.worker",
            "--fd-in", str(to_worker_r), "--fd-out", str(from_worker_w), "--config", json.dumps(config),
        ]
        self._set_state(LOADING, os.path.basename(self.config.model_path) or self.config.backend)
        self._load_error, self._load_plan, self._hung, self._ready_at = "", {}, False, None
        self.starts += 1
        # The worker's fd 1 is our stderr: llama.cpp may print while loading, and our stdout is JSON-RPC.
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            pass_fds=(to_worker_r, from_worker_w),
            close_fds=True,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.pid = self._proc.pid
        self._fd_to_worker = to_worker_w
        threading.Thread(target=self._read_loop, args=(from_worker_r, self._proc), daemon=True).start()
        if self.config.load_timeout_s > 0 and self._loop is not None:
            self._loop.call_later(self.config.load_timeout_s, self._check_load, self._proc)

    def _check_load(self, proc: subprocess.Popen) -> None:
        if proc is self._proc and self.state == LOADING and proc.poll() is None:
            self._load_error = f"the model did not load within {self.config.load_timeout_s:g} s"
            log.error("%s: killing the worker", self._load_error)
            proc.kill()

    def _read_loop(self, fd: int, proc: subprocess.Popen) -> None:
        try:
            while True:
                try:
                    msg = read_frame(fd)
                except (OSError, ValueError) as exc:
                    log.warning("bad message from the model worker: %s", exc)
                    msg = None
                if msg is None:
                    break
                self._post(self._on_message, msg, proc)
        finally:
            os.close(fd)
            code = proc.wait()
            self._post(self._on_exit, proc, code)

    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # loop closed while shutting down

    def _on_message(self, msg: dict, proc: subprocess.Popen) -> None:
        if proc is not self._proc:
            return
        ev = msg.get("ev")
        if ev == "tick":
            self._last_progress = time.monotonic()
        elif ev == "ready":
            self.info = msg.get("info") or {}
            self._ready_at = time.monotonic()
            self._set_state(READY, self.info.get("name", ""))
            log.info("model ready: %s", self.info.get("name") or self.config.model_path)
        elif ev == "plan":
            self._load_plan = msg.get("plan") or {}
        elif ev == "load_failed":
            self._load_error = str(msg.get("error", "unknown error"))
            log.error("model load failed: %s", self._load_error)
        elif ev == "partial":
            self._last_progress = time.monotonic()
            job = self._jobs.get(int(msg.get("id", -1)))
            if job and job.partial is not None and not job.partial.done():
                job.partial.set_result(str(msg.get("text", "")))
        elif ev == "done":
            self._last_progress = time.monotonic()
            job = self._jobs.pop(int(msg["id"]), None)
            self._lanes.pop(int(msg["id"]), None)
            if job and not job.future.done():
                job.future.set_result(GenerationResult.from_dict(msg.get("result") or {}))

    def _on_exit(self, proc: subprocess.Popen, code: int) -> None:
        if proc is not self._proc:
            return
        self._proc = None
        self.pid = None
        self._close_pipe_to_worker()
        why = (f"model worker hung (no progress for {self.config.hang_timeout_s:g} s)" if self._hung
               else f"model worker exited with {code}")
        self._answer_all(why)
        if self._closing:
            self._set_state(STOPPED)
            return
        load_error, self._load_error = self._load_error, ""
        if self.state == LOADING:
            layers = int(self._load_plan.get("n_gpu_layers") or 0)
            if self.config.gpu_oom_retry and layers > 0 and (
                    any(sign in load_error.lower() for sign in OOM_SIGNS) or (not load_error and code != 0)):
                # Out of GPU memory (an exception, or llama.cpp's abort): fewer layers may fit.
                self.config.n_gpu_layers = layers // 2
                log.warning("the model did not load with %d GPU layers (%s); trying %d", layers,
                            load_error or f"exit code {code}", self.config.n_gpu_layers)
                self._spawn()
                return
            # A model that cannot load will not load on a retry: wait for a new configuration or a command.
            self._set_state(FAILED, load_error or f"model worker exited with code {code} while loading")
            return
        now = time.monotonic()
        self.crashes += 1
        delay = self.policy.on_crash(now, self._ready_at)
        if delay is None:
            log.error("%s; %d crashes within %.0f s: the model is off until the settings change or "
                      "offpilot.restartModel", why, len(self.policy.crashes), self.policy.window_s)
            self._set_state(DISABLED, f"the model worker crashed {len(self.policy.crashes)} times in "
                                      f"{self.policy.window_s:.0f} s ({why}); it stays off until the model settings "
                                      "change or the offpilot.restartModel command")
            return
        log.warning("%s; restarting in %.1f s", why, delay)
        self._set_state(BACKOFF, f"restarting in {delay:g} s")
        assert self._loop is not None
        self._restart_handle = self._loop.call_later(delay, self._restart)

    def _answer_all(self, why: str) -> None:
        """Every job still waiting gets its answer: the worker that had it is gone."""
        for job in list(self._jobs.values()):
            if not job.future.done():
                job.future.set_result(GenerationResult(finish="crashed", error=why))
        self._jobs.clear()
        self._lanes.clear()

    # ---- hang watchdog -----------------------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self.config.hang_timeout_s > 0 and self._loop is not None:
            self._watchdog = self._loop.call_later(min(1.0, self.config.hang_timeout_s / 4), self._check_hang)

    def _check_hang(self) -> None:
        self._watchdog = None
        proc = self._proc
        if not self._jobs or proc is None or self._closing:
            return
        silent_s = time.monotonic() - self._last_progress
        if silent_s >= self.config.hang_timeout_s:
            log.warning("model worker %d made no progress for %.1f s: killing it", proc.pid, silent_s)
            self._hung = True
            try:
                proc.kill()  # the reader sees the pipe close: _on_exit answers the jobs and restarts
            except OSError:
                pass
            return
        self._arm_watchdog()

    def _restart(self) -> None:
        self._restart_handle = None
        if not self._closing and self._proc is None:
            self._spawn()

    async def wait_ready(self, timeout_s: float) -> bool:
        if self.state == READY:
            return True
        if self._ready_event is None:
            return False
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return self.state == READY

    async def stop(self, timeout_s: float = 2.0) -> None:
        self._closing = True
        if self._restart_handle:
            self._restart_handle.cancel()
        proc = self._proc
        if proc is None:
            self._set_state(STOPPED)
            return
        try:
            if self._fd_to_worker is not None:
                write_frame(self._fd_to_worker, {"op": "shutdown"})
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop at once, from any thread state (used at exit)."""
        self._closing = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    # ---- jobs --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        assert self._loop is not None
        job = Job(next(self._ids), self._loop.create_future(), self._loop.create_future())
        if self.state != READY or self._fd_to_worker is None:
            job.future.set_result(GenerationResult(finish="not_ready", error=self.state))
            return job
        if not self._jobs:
            self._last_progress = time.monotonic()  # only when idle: a stream of submits must not hide a hang
        self._jobs[job.id] = job
        self._lanes[job.id] = request.lane
        self._arm_watchdog()
        completions = sum(1 for lane in self._lanes.values() if lane == "completion")
        self.max_in_flight = max(self.max_in_flight, completions)
        try:
            write_frame(self._fd_to_worker, {"op": "generate", "id": job.id, "request": request.to_dict()})
            self.generations_started += 1
        except OSError as exc:
            self._jobs.pop(job.id, None)
            self._lanes.pop(job.id, None)
            job.future.set_result(GenerationResult(finish="crashed", error=str(exc)))
        return job

    def follow(self, job: Job, typed: str) -> None:
        """The user typed `typed` at the job's cursor: the worker stops it as soon as its text says otherwise."""
        if job.future.done() or self._fd_to_worker is None:
            return
        try:
            write_frame(self._fd_to_worker, {"op": "follow", "id": job.id, "typed": typed})
        except OSError:
            pass

    def cancel(self, job: Job) -> None:
        if job.future.done() or self._fd_to_worker is None:
            return
        try:
            write_frame(self._fd_to_worker, {"op": "cancel", "id": job.id})
        except OSError:
            pass
