"""FIM prompt templates (files in prompts/fim/), family detection, and token budgets.

A template is rendered into segments: the template's own text (special tokens such as
`<|fim_prefix|>`) is tokenized with special tokens enabled, the user's code never is, so code that
happens to contain `<|endoftext|>` cannot end the prompt early.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

Tokenize = Callable[[str], list[int]]


def prompts_dir() -> Path:
    packaged = Path(__file__).with_name("prompts")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "prompts"


@dataclass(frozen=True)
class FimTemplate:
    family: str
    template: str
    stop: tuple[str, ...]
    detect_tokens: tuple[str, ...]
    architectures: tuple[str, ...]
    add_bos: bool
    source: str
    """File name, for the log line and cache key."""
    repo_template: str = ""
    """Repository-level layout (`${repo_name}`, `${files}`, `${path}`, `${prefix}`, `${suffix}`), if any."""
    file_template: str = ""
    """How one other file's snippet is written inside `${files}` (`${path}`, `${content}`)."""


@dataclass
class Segment:
    """A piece of the prompt: literal template text (special) or a value cut to a token budget."""

    text: str
    special: bool = False
    budget_tokens: int | None = None
    keep: str = "end"
    """Which end of an over-budget value survives: "end" (text before the cursor) or "start"."""
    pinned: str = ""
    """Lines (the enclosing scopes' first lines) kept in front of the window whenever the cut drops them."""
    pinned_at: int = -1
    """Where `pinned` starts in `text` (-1: before it), so the worker knows whether the cut dropped it."""
    first_line: int = -1
    """Document line number of the text's first line (-1: unknown), for anchored cuts."""
    anchor_lines: int = 0
    """Cut from the start only at document lines that are multiples of this (0: anywhere)."""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("text", "special", "budget_tokens", "keep", "pinned", "pinned_at", "first_line", "anchor_lines")}

    @staticmethod
    def from_dict(d: dict) -> "Segment":
        return Segment(
            str(d["text"]), bool(d.get("special")), d.get("budget_tokens"), str(d.get("keep", "end")),
            str(d.get("pinned", "")), int(d.get("pinned_at", -1)), int(d.get("first_line", -1)), int(d.get("anchor_lines", 0)),
        )


@dataclass
class PromptValue:
    text: str
    budget_tokens: int | None = None
    keep: str = "end"
    pinned: str = ""
    pinned_at: int = -1
    first_line: int = -1
    anchor_lines: int = 0


@lru_cache(maxsize=None)
def load_templates(directory: str | None = None) -> dict[str, FimTemplate]:
    root = Path(directory) if directory else prompts_dir() / "fim"
    templates: dict[str, FimTemplate] = {}
    for path in sorted(root.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        templates[data["family"]] = FimTemplate(
            family=data["family"],
            template=data["template"],
            stop=tuple(data.get("stop", ())),
            detect_tokens=tuple(data.get("detect_tokens", ())),
            architectures=tuple(data.get("architectures", ())),
            add_bos=bool(data.get("add_bos", False)),
            source=f"fim/{path.name}",
            repo_template=data.get("repo_template", ""),
            file_template=data.get("file_template", ""),
        )
    return templates


def probe_tokens(templates: Iterable[FimTemplate]) -> list[str]:
    """Every token text the family detection wants to look up in a model's vocabulary."""
    seen: dict[str, None] = {}
    for t in templates:
        for tok in (*t.detect_tokens, *t.stop):
            seen[tok] = None
    return list(seen)


# Most specific first: CodeGemma and Qwen share <|fim_prefix|>; the file separator tells them apart.
_DETECTION_ORDER = ("qwen2.5-coder", "codegemma", "starcoder2", "deepseek-coder", "codestral", "codellama")


def detect_family(special_tokens: Iterable[str], architecture: str = "") -> str | None:
    """Pick the FIM family whose special tokens are all single tokens in the model's vocabulary."""
    present = set(special_tokens)
    templates = load_templates()
    for family in _DETECTION_ORDER + tuple(f for f in templates if f not in _DETECTION_ORDER):
        t = templates.get(family)
        if t and t.detect_tokens and all(tok in present for tok in t.detect_tokens):
            return family
    for t in templates.values():
        if architecture and architecture in t.architectures and not t.detect_tokens:
            return t.family
    return None


def render(template: FimTemplate, values: dict, layout: str | None = None) -> list[Segment]:
    """Split the template at its placeholders; literal parts become special segments."""
    layout = template.template if layout is None else layout
    segments: list[Segment] = []
    pattern = string.Template.pattern
    pos = 0
    for match in pattern.finditer(layout):
        literal = layout[pos : match.start()]
        if literal:
            segments.append(Segment(literal, special=True))
        name = match.group("named") or match.group("braced")
        if match.group("escaped") is not None:
            segments.append(Segment("$", special=True))
        elif name is not None:
            value = values.get(name, PromptValue(""))
            if isinstance(value, list):  # already rendered segments (the other files' snippets)
                segments.extend(value)
            else:
                segments.append(Segment(value.text, False, value.budget_tokens, value.keep, value.pinned, value.pinned_at,
                                        value.first_line, value.anchor_lines))
        pos = match.end()
    tail = layout[pos:]
    if tail:
        segments.append(Segment(tail, special=True))
    return segments


@dataclass
class PromptParts:
    """Everything the prompt may hold, most stable first; each part with its token budget."""

    prefix: PromptValue
    suffix: PromptValue
    path: str = ""
    repo_name: str = ""
    snippets: list[tuple[str, str]] = field(default_factory=list)
    """(path, text) of code from other files: definitions this file imports, recently edited regions."""
    snippet_budget_tokens: int = 0
    comment: str = "#"
    """The language's line comment, for families without a repository layout."""
    middle: str = ""
    """Text the middle starts with (the cursor line before the cursor), written after the template's middle
    marker; for layouts that end with the prefix (suffix-prefix-middle) it is simply the prefix's end."""


def assemble(template: FimTemplate, parts: PromptParts) -> list[Segment]:
    """The prompt's segments. Families with a repository layout (Qwen2.5-Coder) get the other files as
    files of the repository; the others get them as a comment block at the top of the prefix.

    With no other files the plain layout is used: measured on Qwen2.5-Coder-0.5B-Instruct, the repository
    header alone turned `return |` in `def add(a, b)` from "a + b" into "n"."""
    if parts.middle and _last_placeholder(template.template) == "prefix":
        p = parts.prefix
        parts = replace(parts, prefix=replace(p, text=p.text + parts.middle), middle="")
    snippets = [s for s in parts.snippets if s[1].strip()]
    per_snippet = parts.snippet_budget_tokens // len(snippets) if snippets else 0
    if template.repo_template and template.file_template and snippets:
        files: list[Segment] = []
        for path, text in snippets:
            files.extend(render(template, {"path": PromptValue(path), "content": PromptValue(text, per_snippet, "start")}, template.file_template))
        values = {
            "repo_name": PromptValue(parts.repo_name or "project"),
            "files": files,
            "path": PromptValue(parts.path or "untitled"),
            "prefix": parts.prefix,
            "suffix": parts.suffix,
        }
        return render(template, values, template.repo_template) + _middle(parts)
    p = parts.prefix
    prefix = [Segment(_as_comment(path, text, parts.comment), budget_tokens=per_snippet, keep="start") for path, text in snippets]
    prefix.append(Segment(p.text, False, p.budget_tokens, p.keep, p.pinned, p.pinned_at, p.first_line, p.anchor_lines))
    return render(template, {"prefix": prefix, "suffix": parts.suffix}) + _middle(parts)


def _middle(parts: PromptParts) -> list[Segment]:
    # Kept whole (keep="start", no budget): the prefix, the last "end"-kept plain segment, gets what is left.
    return [Segment(parts.middle, keep="start")] if parts.middle else []


def _last_placeholder(layout: str) -> str:
    names = [m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(layout)]
    names = [n for n in names if n]
    return names[-1] if names else ""


def _as_comment(path: str, text: str, comment: str) -> str:
    lines = [f"{comment} {path}"] + [f"{comment} {line}" if line.strip() else comment for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def _lines_keepends(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    # splitlines also splits on \f, U+2028 ...; rejoin so only \n ends a piece (tokenizers see the rest as text).
    out: list[str] = []
    for piece in lines:
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def fit_to_budget(
    text: str, budget_tokens: int | None, keep: str, tokenize: Tokenize, *, first_line: int = -1, anchor_lines: int = 0
) -> tuple[int, list[int]]:
    """Cut `text` at line boundaries to at most `budget_tokens` tokens; returns (characters kept, tokens).

    Keeps the end (keep="end") or the start (keep="start"). A single line longer than the budget is cut
    by tokens. With `anchor_lines` and the document line number of the text's first line (`first_line`),
    a cut from the start moves back to a document line that is a multiple of `anchor_lines` (up to
    anchor_lines - 1 lines over the budget): the window then keeps its first line while the user types, so
    the model's KV cache for it is reused (a cut right at the budget moves with every line's worth of
    typed tokens, and nothing after the move can be reused).
    """
    tokens = tokenize(text)
    if budget_tokens is None or len(tokens) <= budget_tokens:
        return len(text), tokens
    if budget_tokens <= 0:
        return 0, []
    lines = _lines_keepends(text)
    if keep == "end":
        lines.reverse()
    kept: list[str] = []
    used = 0
    for line in lines:
        n = len(tokenize(line))
        if used + n > budget_tokens:
            break
        kept.append(line)
        used += n
    if keep == "end":
        kept.reverse()
    result = "".join(kept)
    if not kept:
        # The line at the cursor alone is over budget: keep the tokens nearest the cursor.
        line = lines[0]
        line_tokens = tokenize(line)
        return 0, line_tokens[-budget_tokens:] if keep == "end" else line_tokens[:budget_tokens]
    tokens = tokenize(result)
    while len(tokens) > budget_tokens and kept:
        # Per-line counts can undercount where tokens merge across lines.
        kept.pop(0 if keep == "end" else -1)
        result = "".join(kept)
        tokens = tokenize(result)
    if keep == "end" and anchor_lines > 0 and first_line >= 0:
        # Start earlier, at the anchor line at or before the cut: never less context than the budget gives,
        # at most anchor_lines - 1 lines more.
        dropped = len(lines) - len(kept)
        extra = min(dropped, (first_line + dropped) % anchor_lines)
        if extra:
            kept = list(reversed(lines[len(kept) : len(kept) + extra])) + kept
            result = "".join(kept)
            tokens = tokenize(result)
    return len(result), tokens


@dataclass
class BuiltPrompt:
    tokens: list[int]
    segment_token_counts: list[int] = field(default_factory=list)


def build_prompt_tokens(
    segments: list[Segment],
    *,
    tokenize_text: Tokenize,
    tokenize_special: Tokenize,
    bos: list[int],
    max_prompt_tokens: int | None = None,
) -> BuiltPrompt:
    """Token ids of the whole prompt: special text with special tokens, values as plain text in budget.

    With `max_prompt_tokens`, the text before the cursor (the one "end"-kept segment with a pinned
    header slot, i.e. the prefix) gets what the other parts leave: other files cost no extra prefill."""
    prefix = _prefix_of(segments)
    fill = next((i for i, seg in enumerate(segments) if seg is prefix), None)
    pieces: list[list[int] | None] = [None] * len(segments)
    for i, seg in enumerate(segments):
        if i != fill:
            pieces[i] = _segment_tokens(seg, seg.budget_tokens, tokenize_text, tokenize_special)
    if fill is not None:
        budget = segments[fill].budget_tokens
        if max_prompt_tokens is not None:
            used = len(bos) + sum(len(p) for p in pieces if p is not None)
            budget = max(0, min(budget if budget is not None else max_prompt_tokens, max_prompt_tokens - used))
        pieces[fill] = _segment_tokens(segments[fill], budget, tokenize_text, tokenize_special)
    out = list(bos)
    for p in pieces:
        out.extend(p or [])
    return BuiltPrompt(out, [len(p or []) for p in pieces])


def _prefix_of(segments: list[Segment]) -> Segment | None:
    """The segment of text before the cursor: the last plain segment kept from its end."""
    plain = [seg for seg in segments if not seg.special and seg.keep == "end"]
    return plain[-1] if plain else None


def _segment_tokens(seg: Segment, budget: int | None, tokenize_text: Tokenize, tokenize_special: Tokenize) -> list[int]:
    if seg.special:
        return tokenize_special(seg.text)
    anchor = {"first_line": seg.first_line, "anchor_lines": seg.anchor_lines}
    kept, toks = fit_to_budget(seg.text, budget, seg.keep, tokenize_text, **anchor)
    if seg.pinned and seg.keep == "end" and len(seg.text) - kept > seg.pinned_at:
        # The window no longer reaches the enclosing scopes' first lines: put them in front.
        pinned = tokenize_text(seg.pinned)
        room = (budget or 0) - len(pinned)
        if room > 0:
            _, toks = fit_to_budget(seg.text, room, seg.keep, tokenize_text, **anchor)
            toks = pinned + toks
    return toks
