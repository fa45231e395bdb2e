"""The language server: state, engine start-up, and the one place where handlers are registered."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled
from pygls.lsp.server import LanguageServer

from . import __version__, prompts
from .actions import ActionService
from .completion import CompletionService
from .config import Settings, merge
from .documents import DocumentStore
from .engine.client import DISABLED, FAILED, READY, WorkerClient, WorkerConfig
from .handlers import actions, documents, inline, lifecycle
from .languages import uri_path
from .models import ModelInstallError, resolve_model
from .protocol import OffpilotProtocol

log = logging.getLogger("offpilot.server")


class OffpilotServer(LanguageServer):
    def __init__(self, *, model_path: str | None = None, engine_overrides: dict | None = None) -> None:
        super().__init__("offpilot", __version__, protocol_cls=OffpilotProtocol)
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
        merge(self.settings, params.initialization_options, source="initializationOptions")
        roots = [f.uri for f in params.workspace_folders or []] or ([params.root_uri] if params.root_uri else [])
        self.completions.crossfile.roots = [Path(uri_path(uri)).resolve() for uri in roots if uri.startswith("file:")]

    def reconfigure(self, settings) -> None:
        """workspace/didChangeConfiguration: completion and cache settings apply to the next request; model
        and worker settings when the server next starts (a model is not reloaded behind the user's back)."""
        before = dataclasses.asdict(self.settings.model), dataclasses.asdict(self.settings.worker)
        merge(self.settings, settings, source="didChangeConfiguration")  # each bad value: one warning in the log
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
            self.engine.fail(str(exc))
            self._tell_failure(f"offpilot: {exc}")
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
        }

    def report_server_error(self, error: Exception, source) -> None:
        # pygls's default shows a message per error; a malformed-message storm must not flood the user.
        if isinstance(error, JsonRpcRequestCancelled):
            log.info("%s: %s", getattr(source, "__name__", source), error)
            return
        log.error("%s: %s", getattr(source, "__name__", source), error)


def create_server(*, model_path: str | None = None, engine_overrides: dict | None = None) -> OffpilotServer:
    server = OffpilotServer(model_path=model_path, engine_overrides=engine_overrides)
    server.feature(types.INITIALIZE)(lifecycle.initialize)
    server.feature(types.INITIALIZED)(lifecycle.initialized)
    server.feature(types.SHUTDOWN)(lifecycle.shutdown)
    server.feature("offpilot/status")(lifecycle.status)
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
