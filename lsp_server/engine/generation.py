"""Turning a stream of generated text pieces into a suggestion: stop strings, line rules, limits."""

from __future__ import annotations

from .protocol import GenerationRequest


class TextAccumulator:
    """Feeds on text pieces and says when to stop; `text` is the suggestion so far."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.text = ""
        self.finish: str | None = None
        self._brackets = _BracketDepth()

    def feed(self, piece: str) -> bool:
        """Add a piece; returns True when generation should stop."""
        self.text += piece
        for stop in self.request.stop:
            if stop and stop in self.text:
                self.text = self.text[: self.text.index(stop)]
                self.finish = "stop"
                return True
        if self.request.single_line:
            cut = _first_line_end_after_content(self.text)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish = "stop"
                return True
        else:
            close_at = self._brackets.feed(piece, len(self.text) - len(piece))
            if close_at is not None:
                # A closer for a bracket opened before the cursor: the enclosing block or call ends here,
                # and its closer is already in the document.
                line_start = self.text.rfind("\n", 0, close_at) + 1
                cut = line_start if not self.text[line_start:close_at].strip() else close_at
                self.text = self.text[:cut].rstrip(" \t")
                self.finish = "brackets"
                return True
            lines = self.text.split("\n")
            cut = _first_line_below_indent(lines, self.request.min_indent)
            if cut is not None:
                self.text = "\n".join(lines[:cut])
                self.finish = "indent"
                return True
            if len(lines) > self.request.max_lines:
                self.text = "\n".join(lines[: self.request.max_lines])
                self.finish = "lines"
                return True
        return False

    def end(self, finish: str) -> str:
        """Close the suggestion; a multi-line one cut mid-line keeps only its complete lines."""
        if self.finish is None:
            self.finish = finish
        if finish in ("length", "timeout", "cancelled") and not self.request.single_line and "\n" in self.text.strip("\n"):
            self.text = self.text[: self.text.rstrip("\n").rfind("\n")]
        return self.text


class _BracketDepth:
    """Bracket depth of generated code, skipping brackets inside string literals."""

    def __init__(self) -> None:
        self.depth = 0
        self.quote = ""
        self.escaped = False

    def feed(self, piece: str, base: int) -> int | None:
        """Offset (in the whole text) of the first closer that goes below depth 0, if any."""
        for i, ch in enumerate(piece):
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == self.quote or (ch == "\n" and self.quote != "`"):
                    self.quote = ""
            elif ch in "\"'`":
                self.quote = ch
            elif ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                self.depth -= 1
                if self.depth < 0:
                    return base + i
        return None


def _first_line_below_indent(lines: list[str], min_indent: int) -> int | None:
    """Index of the first later line that starts left of the cursor's block: the block has ended."""
    if min_indent <= 0:
        return None
    for i, line in enumerate(lines[1:], start=1):
        stripped = line.lstrip(" \t")
        if not stripped:
            continue  # blank so far: its indentation is not known yet
        if len(line) - len(stripped) < min_indent:
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
