"""FIM prompt templates (files in prompts/fim/), family detection, and token budgets.

A template is rendered into segments: the template's own text (special tokens such as
`<|fim_prefix|>`) is tokenized with special tokens enabled, the user's code never is, so code that
happens to contain `<|endoftext|>` cannot end the prompt early.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass, field
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


@dataclass
class Segment:
    """A piece of the prompt: literal template text (special) or a value cut to a token budget."""

    text: str
    special: bool = False
    budget_tokens: int | None = None
    keep: str = "end"
    """Which end of an over-budget value survives: "end" (text before the cursor) or "start"."""

    def to_dict(self) -> dict:
        return {"text": self.text, "special": self.special, "budget_tokens": self.budget_tokens, "keep": self.keep}

    @staticmethod
    def from_dict(d: dict) -> "Segment":
        return Segment(str(d["text"]), bool(d.get("special")), d.get("budget_tokens"), str(d.get("keep", "end")))


@dataclass
class PromptValue:
    text: str
    budget_tokens: int | None = None
    keep: str = "end"


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


def render(template: FimTemplate, values: dict[str, PromptValue]) -> list[Segment]:
    """Split the template at its placeholders; literal parts become special segments."""
    segments: list[Segment] = []
    pattern = string.Template.pattern
    pos = 0
    for match in pattern.finditer(template.template):
        literal = template.template[pos : match.start()]
        if literal:
            segments.append(Segment(literal, special=True))
        name = match.group("named") or match.group("braced")
        if match.group("escaped") is not None:
            segments.append(Segment("$", special=True))
        elif name is not None:
            value = values.get(name, PromptValue(""))
            segments.append(Segment(value.text, budget_tokens=value.budget_tokens, keep=value.keep))
        pos = match.end()
    tail = template.template[pos:]
    if tail:
        segments.append(Segment(tail, special=True))
    return segments


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


def fit_to_budget(text: str, budget_tokens: int | None, keep: str, tokenize: Tokenize) -> list[int]:
    """Tokens of `text` cut at line boundaries to at most `budget_tokens` tokens.

    Keeps the end (keep="end") or the start (keep="start"). A single line longer than the budget is cut
    by tokens.
    """
    tokens = tokenize(text)
    if budget_tokens is None or len(tokens) <= budget_tokens:
        return tokens
    if budget_tokens <= 0:
        return []
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
        return line_tokens[-budget_tokens:] if keep == "end" else line_tokens[:budget_tokens]
    tokens = tokenize(result)
    while len(tokens) > budget_tokens and kept:
        # Per-line counts can undercount where tokens merge across lines.
        kept.pop(0 if keep == "end" else -1)
        result = "".join(kept)
        tokens = tokenize(result)
    return tokens


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
) -> BuiltPrompt:
    """Token ids of the whole prompt: special text with special tokens, values as plain text in budget."""
    out: list[int] = list(bos)
    counts: list[int] = []
    for seg in segments:
        if seg.special:
            toks = tokenize_special(seg.text)
        else:
            toks = fit_to_budget(seg.text, seg.budget_tokens, seg.keep, tokenize_text)
        counts.append(len(toks))
        out.extend(toks)
    return BuiltPrompt(out, counts)
