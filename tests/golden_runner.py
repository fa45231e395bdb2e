"""Golden accept-the-completion cases: a document with a cursor marker, what the model says, and the
exact document after the user accepts the suggestion (or `(no suggestion)`).

File format (tests/golden/<language>/<name>.txt):

    # what the case is about
    -- input.py --
    def f(x):
        return <CURSOR>
    -- model --
    x + 1
    -- expected --
    def f(x):
        return x + 1

The `-- model --` text goes through the same generation rules as a real model's (the worker's stop
rules, piece by piece) and the same post-processing and syntax check as in the server.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from lsp_server.completion import CompletionService
from lsp_server.config import Settings
from lsp_server.context import Snapshot
from lsp_server.engine.backends import FakeBackend
from lsp_server.engine.client import READY, Job
from lsp_server.languages import detect

CURSOR = "<CURSOR>"
NO_SUGGESTION = "(no suggestion)"
GOLDEN_DIR = Path(__file__).parent / "golden"
_SECTION = re.compile(r"^-- (.+?) --$", re.M)


@dataclass
class GoldenCase:
    path: Path
    file_name: str
    document: str
    offset: int
    model: str
    expected: str | None
    """None: no suggestion expected."""


def _strip_one_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def load(path: Path) -> GoldenCase:
    raw = path.read_text(encoding="utf-8")
    parts = _SECTION.split(raw)
    sections = {parts[i]: parts[i + 1][1:] if parts[i + 1].startswith("\n") else parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    input_name = next(name for name in sections if name.startswith("input"))
    document = _strip_one_newline(sections[input_name])
    crlf = "crlf" in path.stem
    if crlf:
        document = document.replace("\n", "\r\n")
    offset = document.index(CURSOR)
    document = document.replace(CURSOR, "", 1)
    expected = _strip_one_newline(sections["expected"])
    if crlf:
        expected = expected.replace("\n", "\r\n")
    return GoldenCase(
        path=path,
        file_name=input_name.split(" ", 1)[1] if " " in input_name else "input.txt",
        document=document,
        offset=offset,
        model=_strip_one_newline(sections["model"]),
        expected=None if expected.strip() == NO_SUGGESTION else expected,
    )


class ScriptedEngine:
    """Answers every job with the case's model text, cut by the same rules the worker applies."""

    def __init__(self, output: str) -> None:
        self.state = READY
        self.detail = ""
        self.info = {"name": "scripted", "architecture": "qwen2", "special_tokens": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"]}
        self.backend = FakeBackend({"outputs": [output]})
        self.requests = []

    def submit(self, request):
        self.requests.append(request)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.backend.generate(request, lambda *_: None))
        return Job(len(self.requests), future)

    def cancel(self, job) -> None:
        pass


async def run_case(case: GoldenCase) -> str | None:
    """The document after accepting the suggestion, or None when there is none."""
    engine = ScriptedEngine(case.model)
    service = CompletionService(engine, Settings())
    uri = f"file:///golden/{case.file_name}"
    info = detect("", uri)
    snap = Snapshot(uri, 1, case.document, case.offset, info.language_ids[0] if info else "plaintext")
    result = await service.complete(snap)
    if not result.text:
        return None
    return case.document[: case.offset] + result.text + case.document[case.offset :]


def all_cases() -> list[Path]:
    return sorted(GOLDEN_DIR.rglob("*.txt"))


_CODECS = {"utf-8": ("utf-8", 1), "utf-16": ("utf-16-le", 2), "utf-32": ("utf-32-le", 4)}


def client_offset(text: str, line: int, character: int, encoding: str) -> int:
    """What an editor does with an LSP position (independently of the server's code): find the line (ends
    are \\n, \\r\\n, \\r), count `character` units of `encoding` into it."""
    lines = re.split(r"(\r\n|\r|\n)", text)
    start = sum(len(part) for part in lines[: 2 * line])
    codec, unit = _CODECS[encoding]
    content = lines[2 * line].encode(codec, "surrogatepass")
    return start + len(content[: character * unit].decode(codec))


async def run_case_lsp(case: GoldenCase, encoding: str) -> str | None:
    """The case through the inline-completion handler with positions in `encoding` (the cursor sent as the
    client would, the item's range applied as the client would), or None when no item comes back."""
    from types import SimpleNamespace

    from lsprotocol import types

    from lsp_server.documents import DocumentStore
    from lsp_server.handlers import inline

    engine = ScriptedEngine(case.model)
    ls = SimpleNamespace(store=DocumentStore(), position_encoding=encoding, completions=CompletionService(engine, Settings()))
    uri = f"file:///golden/{case.file_name}"
    info = detect("", uri)
    ls.store.open(uri, info.language_ids[0] if info else "plaintext", 1, case.document)
    before = case.document[: case.offset]
    line = len(re.findall(r"\r\n|\r|\n", before))
    line_start = max(before.rfind("\n"), before.rfind("\r")) + 1
    codec, unit = _CODECS[encoding]
    character = len(before[line_start:].encode(codec, "surrogatepass")) // unit
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
    )
    result = await inline.inline_completion(ls, params)
    if not result.items:
        return None
    item = result.items[0]
    r = item.range
    start = client_offset(case.document, r.start.line, r.start.character, encoding)
    end = client_offset(case.document, r.end.line, r.end.character, encoding)
    return case.document[:start] + item.insert_text + case.document[end:]
