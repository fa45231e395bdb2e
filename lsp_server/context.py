"""A first context: what the model sees around the cursor, and whether one line or a block is wanted."""

from __future__ import annotations

from dataclasses import dataclass

from . import languages
from .config import CompletionSettings

# Characters that may stand right of the cursor without making it "mid-line": closing brackets,
# quotes and separators that the suggestion usually completes up to.
_CLOSERS = set(")]}>\"'`;,: \t")
# Before the token budget is applied in the worker, cut by characters: no token is shorter than one
# character, and 8 characters per token is far above what code tokenizers average (3-4).
_CHARS_PER_TOKEN_CEILING = 8


@dataclass(frozen=True)
class Snapshot:
    """What the handler froze for one request: the document as it was and the cursor as an offset."""

    uri: str
    version: int
    text: str
    offset: int
    language_id: str = ""


@dataclass
class CompletionContext:
    prefix: str
    suffix: str
    single_line: bool
    language: str
    """Our language name, or "text" when no grammar is known for the document."""
    line_suffix: str
    """Text from the cursor to the end of its line."""
    eol: str
    indent: int = 0
    """Width of the cursor line's indentation (in characters); later lines indented less end a block."""
    skip_reason: str = ""


def _line_bounds(text: str, offset: int) -> tuple[int, int]:
    start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
    end = len(text)
    for sep in ("\n", "\r"):
        i = text.find(sep, offset)
        if i != -1:
            end = min(end, i)
    return start, end


def document_eol(text: str) -> str:
    i = text.find("\n")
    if i > 0 and text[i - 1] == "\r":
        return "\r\n"
    if i == -1 and "\r" in text:
        return "\r"
    return "\n"


def build_context(snap: Snapshot, settings: CompletionSettings) -> CompletionContext:
    text, offset = snap.text, snap.offset
    info = languages.detect(snap.language_id, snap.uri)
    line_start, line_end = _line_bounds(text, offset)
    before = text[line_start:offset]
    after = text[offset:line_end]
    prefix = text[max(0, offset - settings.max_prefix_tokens * _CHARS_PER_TOKEN_CEILING) : offset]
    suffix = text[offset : offset + settings.max_suffix_tokens * _CHARS_PER_TOKEN_CEILING]
    ctx = CompletionContext(
        prefix=prefix,
        suffix=suffix,
        single_line=True,
        language=info.name if info else "text",
        line_suffix=after,
        eol=document_eol(text),
        indent=len(before) - len(before.lstrip(" \t")) if before.strip() else len(before),
    )
    if after[:1].isalnum() or after[:1] == "_":
        ctx.skip_reason = "cursor inside a word"
        return ctx
    code_on_right = any(ch not in _CLOSERS for ch in after)
    if code_on_right:
        ctx.single_line = True
    elif not before.strip():
        ctx.single_line = False
    else:
        openers = info.block_openers if info else ("{", ":")
        ctx.single_line = not before.rstrip().endswith(openers)
    return ctx
