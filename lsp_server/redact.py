"""What never reaches the model or the log: secrets in the text, secret files, invisible characters.

Redaction runs on the prompt's text values (never on the template's own special text) just before a
request goes to the worker, so every source of context (the document, other open documents, files read
from the workspace, an action's code) passes through it. A replacement keeps the line breaks of what it
replaces, so line-anchored windows and line numbers in the prompt stay where they were.

Secret files (by name: `.env*`, `*.pem`, `id_rsa*`, ...) get no AI features at all and never serve as
context for other files.

Invisible and bidirectional-control characters (Trojan Source, CVE-2021-42574; hidden instructions in
"rules files") are stripped from the context, with one warning per document.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .prompts import Segment

log = logging.getLogger("offpilot.redact")

PLACEHOLDER = "[redacted]"

SECRET_GLOBS = (
    ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".npmrc", ".pypirc", ".netrc", ".git-credentials",
    ".htpasswd", "credentials", "credentials.json", "*.tfstate", "*.tfvars", "secrets.yaml", "secrets.yml",
)
"""File names (matched against the last path component, case-insensitively) that are treated as secrets."""

_RULES: tuple[tuple[tuple[str, ...], bool, str], ...] = (
    # (literal hints: the pattern runs only where one occurs; True: case-insensitive hints, line by line; the pattern)
    # PEM private keys; also a block cut by the context window (a BEGIN without its END, or the reverse).
    (("PRIVATE KEY",), False,
     r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*\Z)"),
    (("PRIVATE KEY",), False, r"\A(?:(?!-----BEGIN).)*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"),
    (("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA"), False,
     r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])"),  # AWS key ids
    (("k-live", "k_live", "k-test", "k_test", "k-prod", "k_prod"), False,
     r"(?<![A-Za-z0-9])[sr]k[-_](?:live|test|prod)[-_][A-Za-z0-9]{8,}"),  # Stripe-style keys
    (("sk-",), False, r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"),  # OpenAI / Anthropic-style keys
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), False,
     r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),  # GitHub tokens
    (("glpat-", "npm_", "xox"), False,
     r"(?<![A-Za-z0-9])(?:glpat-[A-Za-z0-9_\-]{20,}|npm_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9\-]{10,})"),
    (("AIza",), False, r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}"),  # Google API keys
    (("eyJ",), False, r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),  # JWTs
    (("://",), False, r"(?P<scheme>://)[^\s:/@'\"]+:[^\s/@'\"]{3,}(?=@)"),  # scheme://user:PASSWORD@host
    # name = "value" where the name says secret (password, api_key, client_secret, ...).
    (("passw", "secret", "credential", "apikey", "api_key", "api-key", "accesskey", "access_key", "access-key",
      "privatekey", "private_key", "private-key", "authtoken", "auth_token", "auth-token"), True,
     r"(?i)(?:passw(?:or)?d|passwd|secret|api[_\-]?key|access[_\-]?key|auth[_\-]?token|private[_\-]?key|credential)"
     r"[A-Za-z0-9_.\-]*[\"']?[ \t]*(?:=|:|:=|=>)[ \t]*[rbuf]?(?P<q>[\"'])(?=[^\"'\s]{6,}(?P=q))[^\"'\n]*(?P=q)"),
)
_PATTERNS = tuple((hints, lower, re.compile(pattern, re.S)) for hints, lower, pattern in _RULES)

INVISIBLE = re.compile(
    "[\u200b\u2060-\u2064\ufeff\u180e\u202a-\u202e\u2066-\u2069\U000e0000-\U000e007f]"
)
"""Zero-width spaces, word joiners, BOMs, bidi embeddings/overrides/isolates and the Tags block. ZWJ and
ZWNJ stay: emoji sequences and several scripts need them."""

_warned_invisible: set[str] = set()
_user_globs: tuple[str, ...] = ()


def configure(secret_files: str) -> None:
    """The user's own globs (setting privacy.secretFiles, comma-separated), added to SECRET_GLOBS."""
    global _user_globs
    _user_globs = tuple(g.strip().lower() for g in secret_files.split(",") if g.strip())


def is_secret_path(path: str) -> bool:
    name = os.path.basename(path.rstrip("/")).lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_GLOBS + _user_globs)


def is_secret_uri(uri: str) -> bool:
    from .languages import uri_path

    return is_secret_path(uri_path(uri))


def _replacement(match: re.Match[str]) -> str:
    text = match.group(0)
    if "scheme" in match.re.groupindex:
        return match.group("scheme") + PLACEHOLDER
    if match.re.groupindex:  # name = "value": keep the name and the quotes
        start = match.start("q") - match.start(0)
        return text[: start + 1] + PLACEHOLDER + match.group("q")
    return PLACEHOLDER + "\n" * text.count("\n")


def redact(text: str) -> str:
    """`text` with every secret-looking value replaced by "[redacted]" (line breaks kept)."""
    if not text:
        return text
    for hints, per_line, pattern in _PATTERNS:
        if not per_line:
            if any(h in text for h in hints):
                text = pattern.sub(_replacement, text)
        else:
            # Case-insensitive names: only the lines that mention one (a whole-text scan costs ~3 ms per 16 KB).
            low = text.lower()
            starts = set()
            for h in hints:
                i = low.find(h)
                while i != -1:
                    starts.add(text.rfind("\n", 0, i) + 1)
                    i = low.find(h, i + 1)
            if not starts:
                continue
            pieces, pos = [], 0
            for start in sorted(starts):
                end = text.find("\n", start)
                end = len(text) if end == -1 else end
                pieces += [text[pos:start], pattern.sub(_replacement, text[start:end])]
                pos = end
            text = "".join(pieces) + text[pos:]
    return text


def _clean(text: str, source: str) -> str:
    found = [] if text.isascii() else INVISIBLE.findall(text)
    if found:
        text = INVISIBLE.sub("", text)
        if source not in _warned_invisible:
            if len(_warned_invisible) > 4096:  # a long session with many documents: forget, warn again
                _warned_invisible.clear()
            _warned_invisible.add(source)
            codes = sorted({f"U+{ord(c):04X}" for c in found})
            log.warning("%d invisible or bidi-control characters (%s) stripped from the context of %s", len(found),
                        " ".join(codes[:8]), source)
    return redact(text)


def prompt_segments(segments: list["Segment"], source: str = "") -> list["Segment"]:
    """The prompt's segments with secrets redacted and invisible characters stripped from their values."""
    from dataclasses import replace

    out = []
    for seg in segments:
        if seg.special or not seg.text:
            out.append(seg)
            continue
        if seg.pinned and 0 <= seg.pinned_at <= len(seg.text):
            head = _clean(seg.text[: seg.pinned_at], source)
            text = head + _clean(seg.text[seg.pinned_at :], source)
            out.append(replace(seg, text=text, pinned=_clean(seg.pinned, source), pinned_at=len(head)))
        else:
            out.append(replace(seg, text=_clean(seg.text, source), pinned=_clean(seg.pinned, source)))
    return out


class RedactingFormatter(logging.Formatter):
    """Log lines with secrets redacted: content is logged only at DEBUG, and even then no secret."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
