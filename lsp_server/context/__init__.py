"""What the model sees around the cursor, and whether to suggest nothing, one line or a block."""

from __future__ import annotations

from dataclasses import dataclass

from .. import languages
from ..config import CompletionSettings
from .syntax import SyntaxFacts

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
    line_prefix: str = ""
    """Text from the start of the cursor's line to the cursor."""
    indent: int = 0
    """Width of the cursor line's indentation (in characters); later lines indented less end a block."""
    indent_unit: str = "    "
    """The document's indentation step (a tab, or some spaces), to re-indent suggestions."""
    header: str = ""
    """First lines of the enclosing scopes, for the prompt when the window does not reach them."""
    header_at: int = -1
    """Where `header` starts within `prefix` (-1: before it)."""
    prefix_first_line: int = 0
    """Document line number (0-based) where `prefix` starts."""
    comment: str = "#"
    skip_reason: str = ""

    @property
    def code_on_right(self) -> bool:
        return has_code(self.line_suffix)


def has_code(line_suffix: str) -> bool:
    """Something other than closing brackets, quotes and separators stands right of the cursor."""
    return any(ch not in _CLOSERS for ch in line_suffix)


def line_suffix_at(text: str, offset: int) -> str:
    return text[offset : _line_bounds(text, offset)[1]]


def inside_word(line_suffix: str) -> bool:
    return line_suffix[:1].isalnum() or line_suffix[:1] == "_"


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


def indent_unit(text: str, sample_lines: int = 2000, default: str = "    ") -> str:
    """The document's indentation step: a tab when most indented lines start with one, else the most
    common increase in leading spaces between consecutive lines (the language's default when nothing
    says otherwise). "" for a document that mixes both on purpose (GNU style: two-space steps, eight
    columns written as a tab), whose suggestions keep the model's own indentation."""
    tabs = spaces = 0
    steps: dict[int, int] = {}
    previous = 0
    for line in text.splitlines()[:sample_lines]:
        if not line.strip():
            continue
        if line.startswith("\t"):
            tabs += 1
            continue
        width = len(line) - len(line.lstrip(" "))
        if width:
            spaces += 1
        if width > previous:
            steps[width - previous] = steps.get(width - previous, 0) + 1
        previous = width
    if tabs and spaces and min(tabs, spaces) * 4 >= tabs + spaces:
        return ""
    if tabs > spaces or (not tabs and not spaces and "\n\t" in text):
        return "\t"
    if not steps:
        return default
    return " " * max(steps, key=lambda k: (steps[k], -k))


def _around(text: str, offset: int, chars: int) -> str:
    """Whole lines within `chars` characters around the offset (a sample of the document's style that costs
    the same on a 5,000-line file as on a short one)."""
    if len(text) <= chars:
        return text
    start = max(0, offset - chars * 3 // 4)
    start = text.find("\n", start) + 1 if start else 0
    return text[start : start + chars]


def _window_start(text: str, cut: int, line_start: int, anchor_lines: int) -> tuple[int, int]:
    """Where the text before the cursor starts, and its line number: the first whole line at or after
    `cut`, moved back to a line whose number is a multiple of `anchor_lines`, so that typing does not move
    it (never past the cursor's line)."""
    if cut <= 0:
        return 0, 0
    start = text.rfind("\n", 0, cut) + 1
    number = text.count("\n", 0, start)
    if start < cut:  # `cut` is inside a line: the next one is the first whole line
        start = text.find("\n", cut) + 1
        number += 1
    back = number % anchor_lines if anchor_lines > 0 else 0
    for _ in range(back):
        start = text.rfind("\n", 0, start - 1) + 1
        number -= 1
    if start <= 0 and number > 0 or start > line_start:
        return line_start, text.count("\n", 0, line_start)
    return start, number


def build_context(snap: Snapshot, settings: CompletionSettings, facts: SyntaxFacts | None = None) -> CompletionContext:
    text, offset = snap.text, snap.offset
    info = languages.detect(snap.language_id, snap.uri)
    line_start, line_end = _line_bounds(text, offset)
    before = text[line_start:offset]
    after = text[offset:line_end]
    prefix_start, prefix_first_line = _window_start(
        text, max(0, offset - settings.max_prefix_tokens * _CHARS_PER_TOKEN_CEILING), line_start, settings.prefix_anchor_lines
    )
    ctx = CompletionContext(
        prefix=text[prefix_start:offset],
        prefix_first_line=prefix_first_line,
        suffix=text[offset : offset + settings.max_suffix_tokens * _CHARS_PER_TOKEN_CEILING],
        single_line=True,
        language=info.name if info else "text",
        line_suffix=after,
        line_prefix=before,
        eol=document_eol(text),
        indent=len(before) - len(before.lstrip(" \t")) if before.strip() else len(before),
        indent_unit=indent_unit(_around(text, offset, 12_000), default=info.indent if info else "    "),
        comment=info.comment if info else "#",
    )
    if facts is not None and facts.headers:
        ctx.header = "\n".join(facts.headers) + "\n"
        ctx.header_at = facts.header_offset - prefix_start
    if inside_word(after):
        ctx.skip_reason = "cursor inside a word"
        return ctx
    if facts is not None and facts.in_comment and before[-1:].isalnum():
        ctx.skip_reason = "typing a word in a comment"
        return ctx
    if ctx.code_on_right:
        # Code right of the cursor: only where the grammar says something is missing there.
        if facts is None or not facts.hole_at_cursor:
            ctx.skip_reason = "code right of the cursor"
            return ctx
        ctx.single_line = True
    elif not before.strip():
        ctx.single_line = False
    else:
        openers = info.block_openers if info else ("{", ":")
        ctx.single_line = not before.rstrip().endswith(openers)
        if not ctx.single_line:
            ctx.indent += 1  # after an opener the block's lines sit deeper than the opener's line
    return ctx
