"""textDocument/codeAction, codeAction/resolve and the offpilot.* commands.

Listing is cheap (a cached tree-sitter parse, never the model). The model runs when an action is resolved
or its command executed, under work-done progress the user can cancel. Edits are versioned
TextDocumentEdits with a change annotation that asks for confirmation, and are never sent for a document
that changed while the model worked.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcRequestCancelled

from .. import languages
from ..actions import EDIT_KINDS, ActionError, ActionTarget, find_target, title
from ..cache import default_directory
from ..languages import uri_path
from ..redact import is_secret_uri

log = logging.getLogger(__name__)

KIND_OF = {
    "explain": "offpilot.explain",
    "refactor": types.CodeActionKind.RefactorRewrite.value,
    "docstring": types.CodeActionKind.RefactorRewrite.value + ".docstring",
    "fix": types.CodeActionKind.QuickFix.value,
}
MAX_FIXES = 3
"""Diagnostics in one request that get a Fix action each."""


# ---- listing ------------------------------------------------------------------------------------------------
def _wanted(kind: str, only: list | None) -> bool:
    """The client's `only` filter: a kind matches itself and its parents ("refactor" takes "refactor.rewrite")."""
    if not only:
        return True
    wanted = [str(getattr(o, "value", o)) for o in only]
    return any(kind == w or kind.startswith(w + ".") or w == "" for w in wanted)


def _client_resolves_edits(ls) -> bool:
    caps = ls.protocol.client_capabilities
    code_action = caps and caps.text_document and caps.text_document.code_action
    support = code_action and code_action.resolve_support
    return bool(support and "edit" in (support.properties or []))


async def _target(ls, doc, start: int, end: int) -> ActionTarget | None:
    info = languages.detect(doc.language_id, doc.uri)
    tree = await ls.completions.syntax.tree(doc.uri, info.name, doc.text) if info is not None and start == end else None
    return find_target(doc.text, info.name if info else None, start, end, tree)


def _range(doc, target: ActionTarget, encoding: str) -> types.Range:
    return types.Range(types.Position(*doc.position_at(target.start, encoding)), types.Position(*doc.position_at(target.end, encoding)))


async def code_action(ls, params: types.CodeActionParams) -> list[types.CodeAction] | None:
    if not ls.settings.actions.enabled:
        return None
    doc = ls.store.get(params.text_document.uri)
    if doc is None or doc.ai_off_reason() or is_secret_uri(doc.uri):  # secret files get no AI actions (F10)
        return None
    encoding = ls.position_encoding
    # Listing reads the range leniently (clamped): some clients end a selection inside a character.
    start = doc.offset_at(params.range.start.line, params.range.start.character, encoding)
    end = doc.offset_at(params.range.end.line, params.range.end.character, encoding)
    only = params.context.only
    actions: list[types.CodeAction] = []
    target = await _target(ls, doc, start, end)
    if target is not None:
        # The action names the request's range; the target is found again (same version) when it runs.
        base = {"uri": doc.uri, "version": doc.version, "range": _json_range(params.range)}
        for kind in ("explain", "refactor", "docstring"):
            if _wanted(KIND_OF[kind], only):
                actions.append(_action(ls, kind, title(ls.actions.prompts[kind], target), {**base, "kind": kind}))
    if _wanted(KIND_OF["fix"], only):
        for diagnostic in (params.context.diagnostics or [])[:MAX_FIXES]:
            at = diagnostic.range.start
            d_start = doc.offset_at(at.line, at.character, encoding)
            d_end = doc.offset_at(diagnostic.range.end.line, diagnostic.range.end.character, encoding)
            fix_range = types.Range(at, at)  # the definition around the problem ...
            fix_target = await _target(ls, doc, d_start, d_start)
            if fix_target is None:  # ... or, outside any, the problem's own lines
                fix_range = diagnostic.range
                fix_target = find_target(doc.text, None, d_start, max(d_end, d_start + 1))
            if fix_target is None:
                continue
            problem = {"message": diagnostic.message, "line": at.line - doc.position_at(fix_target.start, encoding)[0] + 1}
            data = {"uri": doc.uri, "version": doc.version, "kind": "fix", "range": _json_range(fix_range), "diagnostic": problem}
            action = _action(ls, "fix", title(ls.actions.prompts["fix"], fix_target, problem), data)
            action.diagnostics = [diagnostic]
            actions.append(action)
    return actions or None


def _json_range(r: types.Range) -> dict:
    return {"start": {"line": r.start.line, "character": r.start.character}, "end": {"line": r.end.line, "character": r.end.character}}


def _action(ls, kind: str, label: str, data: dict) -> types.CodeAction:
    if kind == "explain":
        return types.CodeAction(title=label, kind=KIND_OF[kind], command=types.Command(title=label, command="offpilot.explain", arguments=[data]))
    action = types.CodeAction(title=label, kind=KIND_OF[kind], data=data)
    if not _client_resolves_edits(ls):  # the edit comes through workspace/applyEdit when the command runs
        action.command = types.Command(title=label, command="offpilot.applyAction", arguments=[data])
    return action


# ---- running ------------------------------------------------------------------------------------------------
def _parse_args(ls, data) -> tuple[object, dict, int, int]:
    """The document and offsets an action's arguments name; a clear JSON-RPC error for anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("uri"), str) or not isinstance(data.get("range"), dict):
        raise JsonRpcInvalidParams("expected an object with uri and range")
    doc = ls.store.get(data["uri"])
    if doc is None:
        raise JsonRpcInvalidParams(f"document not open: {data['uri']}")
    if doc.ai_off_reason():
        raise ActionError(doc.ai_off_reason())
    version = data.get("version")
    if version is not None and version != doc.version:
        raise ActionError("the document changed since this action was offered; ask again")
    try:
        r = data["range"]
        # Read leniently, as the listing did (a selection may end inside a character or past its line); the
        # target is widened to whole lines anyway.
        start = doc.offset_at(int(r["start"]["line"]), int(r["start"]["character"]), ls.position_encoding)
        end = doc.offset_at(int(r["end"]["line"]), int(r["end"]["character"]), ls.position_encoding)
    except (KeyError, TypeError, ValueError) as exc:
        raise JsonRpcInvalidParams(f"bad range: {exc}") from exc
    # A frozen copy: didChange updates the store's Document in place, and the action awaits (its parse, the
    # model); the target, the prompt, the edit's range and its version must all come from one version.
    return doc.copy(), data, start, end


async def _with_progress(ls, label: str, work):
    """Run `work()` as a task under work-done progress; the user's cancel (or the request's) stops the model."""
    task = asyncio.ensure_future(work())
    token = None
    caps = ls.protocol.client_capabilities
    if caps and caps.window and caps.window.work_done_progress:
        token = f"offpilot-action-{uuid.uuid4().hex[:8]}"
        try:
            await ls.work_done_progress.create_async(token)
            ls.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="offpilot", message=label, cancellable=True))
            ls.action_tasks[token] = task
        except Exception as exc:
            log.debug("no work-done progress: %s", exc)
            token = None
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            task.cancel()  # the request itself was cancelled ($/cancelRequest): pygls answers it
            raise
        # The user cancelled the progress: answer the request (an escaping CancelledError would leave a
        # command unanswered in pygls).
        raise JsonRpcRequestCancelled("cancelled by the user") from None
    finally:
        if token is not None:
            ls.action_tasks.pop(token, None)
            ls.work_done_progress.end(token, types.WorkDoneProgressEnd(message="done" if task.done() and not task.cancelled() else "cancelled"))


def progress_cancelled(ls, params: types.WorkDoneProgressCancelParams) -> None:
    task = ls.action_tasks.get(str(params.token))
    log.info("progress %s cancelled by the client (%s)", params.token, "stopping" if task else "unknown")
    if task is not None:
        task.cancel()


async def _run(ls, doc, data: dict, start: int, end: int, kind: str):
    info = languages.detect(doc.language_id, doc.uri)
    target = await _target(ls, doc, start, end)
    if target is None:
        raise ActionError("nothing to act on here: select some code or put the cursor inside a function or class")
    label = title(ls.actions.prompts[kind], target, data.get("diagnostic"))
    instruction = data.get("instruction") if isinstance(data.get("instruction"), str) else ""
    diagnostic = data.get("diagnostic") if isinstance(data.get("diagnostic"), dict) else None
    version = doc.version  # `doc` is the frozen copy from _parse_args
    outcome = await _with_progress(ls, label, lambda: ls.actions.run(
        kind, doc.text, info.name if info else None, uri_path(doc.uri), target, instruction, diagnostic))
    current = ls.store.get(doc.uri)
    if kind in EDIT_KINDS and (current is None or current.version != version or current.desynced):
        raise ActionError("the document changed while offpilot was working; nothing was changed, ask again")
    return label, target, outcome


def _edit(ls, doc, target: ActionTarget, new_text: str, label: str) -> types.WorkspaceEdit:
    """A versioned TextDocumentEdit with a change annotation that needs confirmation, as far as the client
    declared it can take them (else a plain edit of the same range)."""
    caps = ls.protocol.client_capabilities
    workspace_edit = caps and caps.workspace and caps.workspace.workspace_edit
    text_range = _range(doc, target, ls.position_encoding)
    if not (workspace_edit and workspace_edit.document_changes):
        return types.WorkspaceEdit(changes={doc.uri: [types.TextEdit(range=text_range, new_text=new_text)]})
    annotated = workspace_edit.change_annotation_support is not None
    annotation = "offpilot"
    edit = (types.AnnotatedTextEdit(range=text_range, new_text=new_text, annotation_id=annotation) if annotated
            else types.TextEdit(range=text_range, new_text=new_text))
    return types.WorkspaceEdit(
        document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(uri=doc.uri, version=doc.version), edits=[edit],
        )],
        change_annotations={annotation: types.ChangeAnnotation(
            label=label, needs_confirmation=True, description="written by the local model; review before applying",
        )} if annotated else None,
    )


def _tell(ls, message: str, kind=types.MessageType.Warning) -> None:
    log.info("action: %s", message)
    ls.window_show_message(types.ShowMessageParams(type=kind, message=f"offpilot: {message}"))


async def resolve(ls, action: types.CodeAction) -> types.CodeAction:
    data = action.data
    if not isinstance(data, dict) or data.get("kind") not in EDIT_KINDS:
        return action
    try:
        doc, data, start, end = _parse_args(ls, data)
        label, target, outcome = await _run(ls, doc, data, start, end, data["kind"])
    except (ActionError, JsonRpcInvalidParams) as exc:
        _tell(ls, str(exc))
        return action  # no edit: nothing changes
    action.edit = _edit(ls, doc, target, outcome.new_text, label)
    return action


async def apply_action(ls, *args) -> dict:
    """offpilot.applyAction: the same as resolving, for clients without resolve support; the edit goes out
    through workspace/applyEdit (the client asks the user, as the annotation says)."""
    data = args[0] if args else None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in EDIT_KINDS:
        raise JsonRpcInvalidParams(f"kind must be one of {', '.join(EDIT_KINDS)}")
    return await _apply(ls, data, kind)


async def refactor_command(ls, *args) -> dict:
    """offpilot.refactor {uri, range, instruction?}: for clients that ask the user for a goal."""
    data = args[0] if args else None
    return await _apply(ls, data, "refactor")


async def _apply(ls, data, kind: str) -> dict:
    try:
        doc, data, start, end = _parse_args(ls, data)
        label, target, outcome = await _run(ls, doc, data, start, end, kind)
    except ActionError as exc:
        _tell(ls, str(exc))
        return {"applied": False, "error": str(exc)}
    reply = await ls.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(edit=_edit(ls, doc, target, outcome.new_text, label), label=label))
    return {"applied": bool(reply and reply.applied), "error": (reply.failure_reason or "") if reply else ""}


async def explain_command(ls, *args) -> dict:
    """offpilot.explain {uri, range}: {"title", "markdown"}; also opened as a read-only file for clients that
    do not show results themselves (setting actions.showDocument)."""
    data = args[0] if args else None
    try:
        doc, data, start, end = _parse_args(ls, data)
        label, target, outcome = await _run(ls, doc, data, start, end, "explain")
    except ActionError as exc:
        _tell(ls, str(exc))
        return {"title": "", "markdown": "", "error": str(exc)}
    if ls.settings.actions.show_document:
        path = _write_explanation(doc.uri, label, outcome.markdown)
        if path is not None:
            await ls.window_show_document_async(types.ShowDocumentParams(uri=path.as_uri(), take_focus=True))
    return {"title": label, "markdown": outcome.markdown}


def _write_explanation(uri: str, label: str, markdown: str) -> Path | None:
    """A read-only Markdown file in the user's cache folder (0700 folder, 0444 file)."""
    folder = default_directory().parent / "explanations"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(uri_path(uri)).name)[:60] or "code"
        path = folder / f"{stem}-{hashlib.sha256((uri + label + markdown).encode()).hexdigest()[:10]}.md"
        if path.exists():
            os.chmod(path, 0o600)
        path.write_text(f"# {label.removeprefix('offpilot: ')}\n\n_{uri_path(uri)}_\n\n{markdown}\n", encoding="utf-8")
        os.chmod(path, 0o444)
        return path
    except OSError as exc:
        log.warning("could not write the explanation file: %s", exc)
        return None
