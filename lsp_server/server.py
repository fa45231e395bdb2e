"""The language server: state, engine start-up, and the one place where handlers are registered."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, NoReturn

from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled
from pygls.lsp.server import LanguageServer

from . import __version__, prompts, redact
from .actions import ActionService
from .completion import CompletionService
from .config import Settings, merge
from .documents import DocumentStore
from .engine.client import DISABLED, FAILED, READY, WorkerClient, WorkerConfig
from .framing import MAX_BODY_BYTES, FrameReader, FrameTooLarge
from .handlers import actions, diagnostics, documents, inline, lifecycle
from .languages import uri_path
from .models import ModelInstallError, resolve_model
from .protocol import OffpilotProtocol, Throttle

log = logging.getLogger("offpilot.server")


class OffpilotServer(LanguageServer):
    WATCHDOG_PERIOD_S = 1.0
    """How often the client's processId is checked (LSP: exit when the parent process is gone)."""
    EXIT_GRACE_S = 1.0
    """After an exit is decided, the process is gone within this, even if the event loop is stuck."""

    def __init__(self, *, model_path: str | None = None, engine_overrides: dict | None = None,
                 max_message_bytes: int = MAX_BODY_BYTES) -> None:
        super().__init__("offpilot", __version__, protocol_cls=OffpilotProtocol)
        self.max_message_bytes = max_message_bytes
        self._exit_lock = threading.Lock()
        self._exiting = False
        self._errors = Throttle(log)
        self.settings = Settings()
        self.store = DocumentStore()
        self._model_path_override = model_path
        self._engine_overrides = engine_overrides or {}
        self.engine = WorkerClient(WorkerConfig())
        self.completions = CompletionService(self.engine, self.settings, open_texts=self.open_texts)
        self.actions = ActionService(self.engine, self.settings, family_of=self._model_family)
        self.action_tasks: dict[str, asyncio.Task] = {}
        """Running actions by their work-done progress token (the user may cancel them there)."""
        self._progress_token: str | None = None
        self._told_failure = ""

    # ---- configuration ------------------------------------------------------------------------------
    def configure(self, params: types.InitializeParams) -> None:
        if params.process_id:
            self.watch_client(params.process_id)
        merge(self.settings, params.initialization_options, source="initializationOptions")
        redact.configure(self.settings.privacy.secret_files)
        roots = [f.uri for f in params.workspace_folders or []] or ([params.root_uri] if params.root_uri else [])
        self.completions.crossfile.roots = [Path(uri_path(uri)).resolve() for uri in roots if uri.startswith("file:")]

    def reconfigure(self, settings) -> None:
        """workspace/didChangeConfiguration: completion and cache settings apply to the next request; model
        and worker settings when the server next starts (a model is not reloaded behind the user's back)."""
        before = dataclasses.asdict(self.settings.model), dataclasses.asdict(self.settings.worker)
        merge(self.settings, settings, source="didChangeConfiguration")  # each bad value: one warning in the log
        redact.configure(self.settings.privacy.secret_files)
        if (dataclasses.asdict(self.settings.model), dataclasses.asdict(self.settings.worker)) != before:
            log.warning("model and worker settings changed: reloading the model")
            self.restart_engine()

    def restart_engine(self) -> None:
        """Load the model again with the current settings (a settings change, or offpilot.restartModel after
        a failed load or the crash breaker): the only ways out of those states, so nothing retries in a loop."""
        self._told_failure = ""

        async def restart() -> None:
            await self.engine.stop()
            await self.start_engine()

        self._restart_task = asyncio.ensure_future(restart())

    def _model_family(self) -> str | None:
        template = self.completions.template() if self.engine.state == READY else None
        return template.family if template else None

    def open_texts(self) -> dict[str, str]:
        return {doc.uri: doc.text for doc in self.store.documents() if not doc.desynced}

    def document_changed(self, uri: str, lines: list[int]) -> None:
        for line in lines:
            self.completions.recent_edits.record(uri, line)

    def document_closed(self, uri: str) -> None:
        self.store.close(uri)
        self.completions.recent_edits.forget(uri)
        self.completions.syntax.forget(uri)
        self.completions.forget(uri)

    @property
    def position_encoding(self) -> str:
        caps = self.protocol.server_capabilities
        encoding = caps.position_encoding if caps and caps.position_encoding else types.PositionEncodingKind.Utf16
        return encoding.value if isinstance(encoding, types.PositionEncodingKind) else str(encoding)

    def client_has_inline_completion(self) -> bool:
        caps = self.protocol.client_capabilities
        return bool(caps and caps.text_document and caps.text_document.inline_completion is not None)

    def _client_supports_progress(self) -> bool:
        caps = self.protocol.client_capabilities
        return bool(caps and caps.window and caps.window.work_done_progress)

    # ---- the model worker -------------------------------------------------------------------------------
    def _worker_config(self) -> WorkerConfig | None:
        m = self.settings.model
        config = WorkerConfig.from_settings(self.settings, prompts.probe_tokens(prompts.load_templates().values()))
        if self._engine_overrides.get("backend") == "fake":
            config.backend = "fake"
            config.fake = dict(self._engine_overrides.get("fake") or {})
            return config
        try:
            config.model_path = str(resolve_model(m.path or self._model_path_override or m.name or None))
        except ModelInstallError as exc:
            # One message: once the engine reports its states to us (after the first start), fail() tells it.
            self.engine._on_state = self._on_engine_state
            self.engine.fail(str(exc))
            return None
        return config

    async def start_engine(self) -> None:
        config = self._worker_config()
        if config is None:
            return
        self.engine.config = config
        self.engine._on_state = self._on_engine_state
        if self._client_supports_progress():
            token = f"offpilot-load-{uuid.uuid4().hex[:8]}"
            try:
                await self.work_done_progress.create_async(token)
                self._progress_token = token
                self.work_done_progress.begin(
                    token, types.WorkDoneProgressBegin(title="offpilot", message="loading the model", cancellable=False)
                )
            except Exception as exc:  # a client that refuses progress still gets completions
                log.debug("no work-done progress: %s", exc)
                self._progress_token = None
        self.engine.start()

    def _on_engine_state(self, state: str, detail: str) -> None:
        if state in (READY, FAILED) and self._progress_token:
            message = "model ready" if state == READY else "model failed to load"
            self.work_done_progress.end(self._progress_token, types.WorkDoneProgressEnd(message=message))
            self._progress_token = None
        if state == FAILED:
            self._tell_failure(f"offpilot: the model could not be loaded: {detail}")
        elif state == DISABLED:
            self._tell_failure(f"offpilot: completions are off: {detail}")
        elif state == READY:
            self._told_failure = ""  # the episode is over: the next failure is news

    def _tell_failure(self, message: str) -> None:
        log.error("%s", message)
        if message != self._told_failure:  # one message per episode, not per keystroke
            self._told_failure = message
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=message))

    async def stop_engine(self) -> None:
        await self.engine.stop()

    def status(self) -> dict:
        template = self.completions.template() if self.engine.state == READY else None
        return {
            "state": self.engine.state,
            "detail": self.engine.detail,
            "model": self.engine.config.model_path or self.engine.config.backend,
            "family": template.family if template else None,
            "workerPid": self.engine.pid,
            "workerStarts": self.engine.starts,
            "workerCrashes": self.engine.crashes,
            "generationsStarted": self.engine.generations_started,
            "maxGenerationsInFlight": self.engine.max_in_flight,
            "positionEncoding": self.position_encoding,
            "openDocuments": len(self.store),
            "plan": self.engine.info.get("plan"),
            "cache": self.completions.cache_report(),
            "lastCompletion": self.completions.last_shown,
            "scheduler": self.completions.scheduler_report(),
        }

    def document_state(self, uri: str) -> dict | None:
        """What the server holds for a document, without its content: tests compare the hash with their
        own copy of the text (and an editor plugin may check it is in sync)."""
        doc = self.store.get(uri)
        if doc is None:
            return None
        return {"uri": uri, "version": doc.version, "length": len(doc.text), "desynced": doc.desynced,
                "sha256": hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()}

    def report_server_error(self, error: Exception, source) -> None:
        # pygls's default shows a message per error; a malformed-message storm must not flood the user
        # (nor the log: a few lines, then one per 10 s with a count).
        if isinstance(error, JsonRpcRequestCancelled):
            log.debug("%s: %s", getattr(source, "__name__", source), error)
            return
        self._errors(logging.ERROR, "%s: %s", getattr(source, "__name__", source), error)

    # ---- transport: stdio ---------------------------------------------------------------------------
    def start_io(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> NoReturn:
        """Serve LSP on stdio until `exit`, end of input, a broken stdout or the client's death; then kill
        and reap the workers and end the process (0 after shutdown/exit, else 1).

        Replaces pygls's reader (see framing.py): a daemon thread reads fd 0 with os.read and hands whole
        bodies to the loop, so no Python-level lock on stdin can block interpreter exit, and the process
        ends with os._exit once the workers are reaped: a stuck executor thread cannot keep it alive."""
        in_fd = (stdin or sys.stdin.buffer).fileno()
        out = stdout or sys.stdout.buffer
        code = 1
        try:
            code = asyncio.run(self._serve_stdio(in_fd, out))
        except BaseException as exc:  # noqa: BLE001 - whatever happened, the workers go with us
            log.error("server loop ended: %s", exc)
        self._finish(code)

    async def _serve_stdio(self, in_fd: int, out: BinaryIO) -> NoReturn:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._exit_code: asyncio.Future[int] = loop.create_future()
        self.protocol.set_writer(_PipeWriter(out, on_broken=lambda: self.request_exit(1, "stdout is closed")))
        self.protocol.on_exit = lambda code: self.request_exit(code, "exit notification")
        drops = Throttle(logging.getLogger("offpilot.framing"))

        def read_loop() -> None:
            reader = FrameReader(lambda n: os.read(in_fd, n), max_body_bytes=self.max_message_bytes,
                                 on_drop=lambda why: drops(logging.WARNING, "dropped input: %s", why))
            try:
                while (body := reader.next_body()) is not None:
                    loop.call_soon_threadsafe(self.protocol.feed, body)
            except FrameTooLarge as exc:
                log.error("%s: exiting, the stream cannot be trusted past it", exc)
                self.request_exit(1, "oversized message")
                return
            except OSError as exc:
                log.error("reading stdin failed: %s", exc)
            why = "end of input" + (" inside a message" if reader.truncated_at_eof else "")

            def end_of_input() -> None:  # on the loop, after the messages read before the end
                self.request_exit(0 if self.protocol.shutdown_received else 1, why)

            try:
                loop.call_soon_threadsafe(end_of_input)
            except RuntimeError:
                pass
            time.sleep(self.EXIT_GRACE_S)
            self.request_exit(1, why + " (the event loop did not answer)")  # a no-op once exiting

        threading.Thread(target=read_loop, name="offpilot-stdin", daemon=True).start()
        # Ends here, inside the loop: asyncio.run's clean-up would cancel handlers mid-way (tracebacks in
        # the log) and wait for executor threads, which a hung parse would make forever.
        self._finish(await self._exit_code)

    def request_exit(self, code: int, why: str) -> None:
        """From any thread: end the process with `code` within EXIT_GRACE_S."""
        with self._exit_lock:
            if self._exiting:
                return
            self._exiting = True
        log.info("exiting (%s), code %d", why, code)
        loop = getattr(self, "_loop", None)

        def resolve() -> None:
            if not self._exit_code.done():
                self._exit_code.set_result(code)

        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:
                pass
        # If the loop cannot get there (a handler stuck without yielding), end the process from here.
        timer = threading.Timer(self.EXIT_GRACE_S * 0.8, self._finish, args=(code,))
        timer.daemon = True
        timer.start()

    def _finish(self, code: int) -> NoReturn:
        try:
            self.engine.kill()
            _reap_children(deadline_s=0.5)
        finally:
            logging.shutdown()
            os._exit(code)

    def watch_client(self, pid: int) -> None:
        """Exit when the client process (initialize's processId) is gone, checked every second, in case
        our stdin outlives it (a wrapper holding the pipe)."""

        def watch() -> None:
            while not self._exiting:
                time.sleep(self.WATCHDOG_PERIOD_S)
                if not _process_alive(pid):
                    self.request_exit(1, f"the client process {pid} is gone")
                    return

        if _process_alive(pid):
            threading.Thread(target=watch, name="offpilot-watchdog", daemon=True).start()
        else:
            log.warning("initialize names processId %d, which is not running: not watching it", pid)


class _PipeWriter:
    """pygls's writer over our private stdout: writes whole frames (a pipe may take part of one), and a
    reader that went away (EPIPE) ends the server instead of raising into every reply."""

    def __init__(self, out: BinaryIO, on_broken) -> None:
        self._fd = out.fileno()
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        view = memoryview(data)
        with self._lock:
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self.broken = True
                log.warning("stdout write failed: %s", exc)
                self._on_broken()

    def close(self) -> None:
        pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a killed process that its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _reap_children(deadline_s: float) -> None:
    """SIGKILL and wait for every child process (model and parser workers, whoever started them)."""
    me = os.getpid()
    pids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                    pids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    end = time.monotonic() + deadline_s
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # reaped elsewhere (the engine's reader thread)
            if done or time.monotonic() > end:
                break
            time.sleep(0.005)


def create_server(*, model_path: str | None = None, engine_overrides: dict | None = None,
                  max_message_bytes: int = MAX_BODY_BYTES) -> OffpilotServer:
    server = OffpilotServer(model_path=model_path, engine_overrides=engine_overrides, max_message_bytes=max_message_bytes)
    server.feature(types.INITIALIZE)(lifecycle.initialize)
    server.feature(types.INITIALIZED)(lifecycle.initialized)
    server.feature(types.SHUTDOWN)(lifecycle.shutdown)
    server.feature("offpilot/status")(lifecycle.status)
    server.feature("offpilot/memory")(diagnostics.memory)
    server.feature("offpilot/documentState")(lifecycle.document_state)
    server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(lifecycle.did_change_configuration)
    server.feature(types.TEXT_DOCUMENT_DID_OPEN)(documents.did_open)
    server.feature(types.TEXT_DOCUMENT_DID_CHANGE)(documents.did_change)
    server.feature(types.TEXT_DOCUMENT_DID_CLOSE)(documents.did_close)
    # An empty options object reads as "absent" in eglot, so say something in it.
    inline_options = types.InlineCompletionOptions(work_done_progress=False)
    server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_options)(inline.inline_completion)
    server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))(inline.completion)
    action_kinds = list(actions.KIND_OF.values())
    server.feature(types.TEXT_DOCUMENT_CODE_ACTION, types.CodeActionOptions(code_action_kinds=action_kinds, resolve_provider=True))(actions.code_action)
    server.feature(types.CODE_ACTION_RESOLVE)(actions.resolve)
    server.feature(types.WINDOW_WORK_DONE_PROGRESS_CANCEL)(actions.progress_cancelled)
    server.command("offpilot.explain")(actions.explain_command)
    server.command("offpilot.refactor")(actions.refactor_command)
    server.command("offpilot.applyAction")(actions.apply_action)
    server.command("offpilot.restartModel")(lifecycle.restart_model)
    return server
