"""From the model's text to what is safe and useful to insert at the cursor."""

from __future__ import annotations

import re

from .context import CompletionContext

MAX_SUGGESTION_BYTES = 8 * 1024
"""An inline suggestion is at most 8 KB (UTF-8, with the document's line ends) and 200 lines (reliability.md D4)."""
MAX_SUGGESTION_LINES = 200
# Bidi controls can make code read differently from what it does (Trojan Source): never inserted.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
# Zero-width characters and the Tags block hide text; inserted only where the code around already has them.
_HIDDEN = re.compile("[\u200b-\u200f\u2060\ufeff\U000e0000-\U000e007f]")
# FIM and special tokens of the supported families, and end-of-text strings, as text the model wrote out.
_SPECIAL_TOKEN = re.compile(
    r"<\|[a-z_]+\|>|<fim_[a-z]+>|<file_sep>|<repo_name>|<｜[^｜]*｜>|▁?<(?:PRE|SUF|MID|EOT)>|\[(?:PREFIX|SUFFIX|MIDDLE)\]|</s>"
)


_CHAT_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>|<(?:start|end)_of_turn>|\[/?INST\]")
MAX_ANSWER_CHARS = 64 * 1024


def strip_invisible(text: str, context: str = "") -> str:
    """`text` without bidi controls, and without zero-width or Tags characters other than those `context` has."""
    text = _BIDI.sub("", text)
    if not _HIDDEN.search(text):
        return text
    allowed = set(_HIDDEN.findall(context))
    return _HIDDEN.sub(lambda m: m.group() if m.group() in allowed else "", text)


def strip_special_tokens(text: str, context: str = "") -> str:
    """A chat answer up to its first special token (FIM or chat), without invisible or bidi controls (those
    the code it is about already has excepted), and within MAX_ANSWER_CHARS."""
    text = _SPECIAL_TOKEN.split(text, maxsplit=1)[0]
    text = _CHAT_TOKEN.split(text, maxsplit=1)[0]
    return strip_invisible(text, context)[:MAX_ANSWER_CHARS]


def cap_size(text: str, eol: str, max_bytes: int = MAX_SUGGESTION_BYTES, max_lines: int = MAX_SUGGESTION_LINES) -> str:
    """At most `max_lines` lines and `max_bytes` UTF-8 bytes once written with `eol`, cut at a line end when
    there is one (a half line is worse than a shorter suggestion)."""
    lines = text.split("\n")[:max_lines]
    text = "\n".join(lines)
    if len(text.encode("utf-8", "surrogatepass")) + (len(eol) - 1) * text.count("\n") <= max_bytes:
        return text
    kept, size = [], 0
    for line in lines:
        cost = len(line.encode("utf-8", "surrogatepass")) + (len(eol) if kept else 0)
        if size + cost > max_bytes:
            break
        kept.append(line)
        size += cost
    if kept:
        return "\n".join(kept)
    # One over-long line: as many whole characters as fit.
    return lines[0].encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def clean(text: str, ctx: CompletionContext, surrounding: str = "") -> str:
    """Sanitize, trim overlap with the code after the cursor, match the document's line ends."""
    text = _SPECIAL_TOKEN.split(text, maxsplit=1)[0]
    text = strip_invisible(text, surrounding)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if ctx.single_line:
        text = text.rstrip()
        text = _drop_retyped_line_start(text, ctx.line_prefix)
        text = _trim_suffix_overlap(text, ctx.line_suffix)
    else:
        text = text.rstrip()
        text = drop_repeated_suffix_lines(text, ctx.suffix)
        text = match_indentation(text, ctx.indent_unit)
    text = cap_size(text, ctx.eol)
    if not text.strip():
        return ""
    if ctx.line_suffix.strip() and text.strip() == ctx.line_suffix.strip():
        return ""
    if ctx.eol != "\n":
        text = text.replace("\n", ctx.eol)
    return text


def match_indentation(text: str, unit: str) -> str:
    """Re-indent lines after the first with the document's step (tabs vs spaces); unit "" (a document
    mixing both) leaves the model's indentation alone."""
    if not unit:
        return text
    lines = text.split("\n")
    leads = [ln[: len(ln) - len(ln.lstrip(" \t"))] for ln in lines[1:] if ln.strip()]
    widths = [len(lead) for lead in leads if lead and "\t" not in lead]
    # The model's own step: the largest common divisor of its space indentations (2, 4 or 8).
    model_step = next((step for step in (8, 4, 2) if widths and all(w % step == 0 for w in widths)), 4)
    out = lines[:1]
    for line in lines[1:]:
        lead = line[: len(line) - len(line.lstrip(" \t"))]
        if unit == "\t" and lead and "\t" not in lead:
            line = "\t" * (len(lead) // model_step) + " " * (len(lead) % model_step) + line[len(lead):]
        elif unit != "\t" and "\t" in lead:
            line = lead.replace("\t", unit) + line[len(lead):]
        out.append(line)
    return "\n".join(out)


def bracket_depth(text: str) -> int:
    """Opening minus closing brackets (strings are not told apart: this is for short suggestions)."""
    return sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")


def _drop_retyped_line_start(text: str, line_prefix: str) -> str:
    """`case |` + model "case 'revoke':" → "'revoke':": the model started the line again."""
    typed = line_prefix.lstrip()
    if typed.strip() and text.startswith(typed) and len(text) > len(typed):
        return text[len(typed):]
    return text


def _trim_suffix_overlap(text: str, line_suffix: str) -> str:
    """`foo(a|)` + model "b, c)" → "b, c": the closing text is already there. But `print(|)` + model
    "len(items)" keeps its ")": the suggestion's own brackets must stay balanced."""
    right = line_suffix.rstrip()
    depth = bracket_depth(text)
    for k in range(min(len(text), len(right)), 0, -1):
        overlap = right[:k]
        if text.endswith(overlap) and overlap.strip() and depth - bracket_depth(overlap) <= 0:
            return text[:-k].rstrip() if overlap == right else text[:-k]
    return text


def drop_repeated_suffix_lines(text: str, suffix: str) -> str:
    """Cut the suggestion where it starts repeating the code after the cursor: at a line equal to the
    first line of code below, or a trailing run of lines equal to the first lines below."""
    following = [ln for ln in suffix.replace("\r\n", "\n").split("\n") if ln.strip()][:20]
    if not following:
        return text
    lines = text.split("\n")
    first = following[0].strip()
    if any(ch.isalnum() for ch in first):
        for i, line in enumerate(lines):
            if line.strip() == first:
                return "\n".join(lines[:i]).rstrip()
    for n in range(min(len(lines), len(following)), 0, -1):
        tail = [ln.strip() for ln in lines[-n:]]
        if tail == [ln.strip() for ln in following[:n]]:
            kept = "\n".join(lines[:-n]).rstrip()
            # A closing "}" that ends the suggestion's own block is not a repeat of the "}" below.
            if not any(ch.isalnum() for ch in "".join(tail)) and bracket_depth(kept) > bracket_depth(text):
                continue
            return kept
    return text
