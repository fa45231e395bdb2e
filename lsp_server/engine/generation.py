"""Turning a stream of generated text pieces into a suggestion: stop strings, line rules, limits."""

from __future__ import annotations

from .protocol import GenerationRequest


class TextAccumulator:
    """Feeds on text pieces and says when to stop; `text` is the suggestion so far."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.text = request.resume_text
        self.finish: str | None = None
        self._line_ends_at_budget: int | None = None

    def feed(self, piece: str, over_budget: bool = False) -> bool:
        """Add a piece; returns True when generation should stop. `over_budget`: the request's decode time
        budget is spent, so a multi-line suggestion ends at its next line end."""
        self.text += piece
        for stop in self.request.stop:
            if stop and stop in self.text:
                self.text = self.text[: self.text.index(stop)]
                self.finish = "stop"
                return True
        if not self.request.line_rules:
            return False
        if self.request.single_line:
            cut = _first_line_end_after_content(self.text)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish = "stop"
                return True
        else:
            close_at = first_unbalanced_close(self.text)
            if close_at is not None:
                # A closer for a bracket opened before the cursor: the enclosing block or call ends here,
                # and its closer is already in the document.
                line_start = self.text.rfind("\n", 0, close_at) + 1
                cut = line_start if not self.text[line_start:close_at].strip() else close_at
                self.text = self.text[:cut].rstrip(" \t")
                self.finish = "brackets"
                return True
            lines = self.text.split("\n")
            cut = _first_line_below_indent(lines, self.request.min_indent, self.request.tab_width)
            if cut is not None:
                self.text = "\n".join(lines[:cut])
                self.finish = "indent"
                return True
            if len(lines) > self.request.max_lines:
                self.text = "\n".join(lines[: self.request.max_lines])
                self.finish = "lines"
                return True
            if over_budget:
                if self._line_ends_at_budget is None:
                    self._line_ends_at_budget = self.text.count("\n") - piece.count("\n")
                if len(lines) - 1 > self._line_ends_at_budget and any(line.strip() for line in lines[:-1]):
                    self.text = "\n".join(lines[:-1])
                    self.finish = "budget"
                    return True
        return False

    def end(self, finish: str) -> str:
        """Close the suggestion; a multi-line one cut mid-line keeps only its complete lines."""
        if self.finish is None:
            self.finish = finish
        if finish in ("length", "timeout", "cancelled") and self.request.line_rules and not self.request.single_line and "\n" in self.text.strip("\n"):
            self.text = self.text[: self.text.rstrip("\n").rfind("\n")]
        return self.text


def first_unbalanced_close(text: str) -> int | None:
    """Offset of the first closing bracket that closes something opened before the text, skipping
    strings, char literals and comments-free code alike. A quote that does not close on its line (a
    Rust lifetime `'a`, an apostrophe) is not a string."""
    depth = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'`":
            end = _string_end(text, i)
            if end is not None:
                i = end + 1
                continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return i
        i += 1
    return None


def _string_end(text: str, start: int) -> int | None:
    quote = text[start]
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == quote:
            return i
        if ch == "\n" and quote != "`":
            return None
        i += 1
    # Unterminated at the end of what was generated so far: a string still being written.
    return len(text) if quote != "'" or "\n" not in text[start:] else None


def _first_line_below_indent(lines: list[str], min_indent: int, tab_width: int = 4) -> int | None:
    """Index of the first later line that starts left of the cursor's block: the block has ended.
    Widths are compared with tabs expanded, so a tab-indented suggestion in a space-indented file works."""
    if min_indent <= 0:
        return None
    for i, line in enumerate(lines[1:], start=1):
        stripped = line.lstrip(" \t")
        if not stripped:
            continue  # blank so far: its indentation is not known yet
        if len(line[: len(line) - len(stripped)].expandtabs(tab_width)) < min_indent:
            return i
    return None


def _first_line_end_after_content(text: str) -> int | None:
    seen_content = False
    for i, ch in enumerate(text):
        if ch in "\r\n":
            if seen_content:
                return i
        elif not ch.isspace():
            seen_content = True
    return None
