"""What the server and the model worker say to each other, and how it is framed on the pipes.

Frames are a 4-byte big-endian length followed by UTF-8 JSON. The worker never writes to fd 1.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field

from ..prompts import Segment

MAX_FRAME_BYTES = 64 * 1024 * 1024


@dataclass
class GenerationRequest:
    segments: list[Segment]
    add_bos: bool = False
    max_prompt_tokens: int | None = None
    """All parts together; the text before the cursor gets what the others leave."""
    max_tokens: int = 48
    stop: list[str] = field(default_factory=list)
    single_line: bool = True
    max_lines: int = 12
    min_indent: int = 0
    """A multi-line suggestion ends before a line indented less than this (the cursor's block ended)."""
    tab_width: int = 4
    """Columns per tab when comparing indentation."""
    temperature: float = 0.0
    timeout_s: float = 30.0
    decode_budget_s: float = 0.0
    """After this much decoding a multi-line suggestion ends at its next line end (0: no budget)."""
    min_tokens: int = 0
    """The model may not end the text (end-of-generation or a one-token stop) before this many tokens."""
    lane: str = "completion"
    """"completion": latest wins, a newer one supersedes it. "action": queued, runs when no completion waits,
    and yields to a waiting completion between tokens (its model state is kept aside and resumed)."""
    line_rules: bool = True
    """False: only stop strings, end-of-generation and max_tokens end the text (no line/indent/bracket rules)."""
    resume_tokens: list[int] = field(default_factory=list)
    """Tokens already generated for this request before it yielded; generation continues after them."""
    resume_text: str = ""
    """The text those tokens made."""
    first_line_first: bool = False
    """Send the first line as soon as it is written (a "partial" event), then go on with the rest."""
    heal_last_token: bool = False
    """When the prompt ends with plain text (a forced start of the middle): take its last token back and let the
    model choose how to write it (any token that starts with that text, or a shorter piece of it), so a word or
    indentation cut at the cursor does not force a token split the model never saw in training."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segments"] = [s.to_dict() for s in self.segments]
        return d

    @staticmethod
    def from_dict(d: dict) -> "GenerationRequest":
        args = dict(d)
        args["segments"] = [Segment.from_dict(s) for s in d.get("segments", [])]
        return GenerationRequest(**args)


@dataclass
class GenerationResult:
    text: str = ""
    finish: str = "stop"
    """stop | length | lines | indent | brackets | budget | eog | cancelled | timeout | crashed | not_ready | error
    (and, inside the worker only, yielded)"""
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    error: str = ""
    tokens: list[int] = field(default_factory=list)
    """Only when finish is "yielded": every token generated so far, to resume from."""

    @staticmethod
    def from_dict(d: dict) -> "GenerationResult":
        known = {k: v for k, v in d.items() if k in GenerationResult.__dataclass_fields__}
        return GenerationResult(**known)


def write_frame(fd: int, message: dict) -> None:
    body = json.dumps(message, ensure_ascii=False).encode("utf-8")
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict | None:
    """The next message, or None at end of stream."""
    header = _read_exact(fd, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes is over the limit")
    body = _read_exact(fd, length)
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))
