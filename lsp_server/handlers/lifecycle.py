"""initialize / initialized / shutdown, settings changes and offpilot/status."""

from __future__ import annotations

from lsprotocol import types


def initialize(ls, params: types.InitializeParams) -> None:
    ls.configure(params)


async def initialized(ls, params: types.InitializedParams) -> None:
    await ls.start_engine()


async def shutdown(ls, params: None) -> None:
    await ls.stop_engine()


def did_change_configuration(ls, params: types.DidChangeConfigurationParams) -> None:
    ls.reconfigure(params.settings)


def status(ls, params) -> dict:
    return ls.status()


def restart_model(ls, *args) -> None:
    """offpilot.restartModel: load the model again (after a failed load or the crash breaker)."""
    ls.restart_engine()


def document_state(ls, params) -> dict | None:
    uri = params.get("uri") if isinstance(params, dict) else getattr(params, "uri", None)
    if not isinstance(uri, str):
        from pygls.exceptions import JsonRpcInvalidParams

        raise JsonRpcInvalidParams("offpilot/documentState takes {uri}")
    return ls.document_state(uri)
