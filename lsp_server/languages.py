"""Which language a document is in, and its tree-sitter grammar (from the per-language wheels, offline)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageInfo:
    name: str
    """Our name for it, e.g. "python", "tsx"."""
    module: str
    """The grammar wheel's module."""
    function: str
    """The module's function that returns the grammar."""
    extensions: tuple[str, ...]
    language_ids: tuple[str, ...]
    block_openers: tuple[str, ...]
    """Line endings after which a new block is expected (the first multi-line rule)."""
    comment: str = "//"
    """The line comment, for context written into the prompt as a comment."""
    indent: str = "    "
    """The usual indentation step when a document does not show its own."""


LANGUAGES: tuple[LanguageInfo, ...] = (
    LanguageInfo("python", "tree_sitter_python", "language", (".py", ".pyi"), ("python",), (":",), "#"),
    LanguageInfo("javascript", "tree_sitter_javascript", "language", (".js", ".mjs", ".cjs", ".jsx"), ("javascript", "javascriptreact"), ("{", "=>")),
    LanguageInfo("typescript", "tree_sitter_typescript", "language_typescript", (".ts", ".mts", ".cts"), ("typescript",), ("{", "=>")),
    LanguageInfo("tsx", "tree_sitter_typescript", "language_tsx", (".tsx",), ("typescriptreact",), ("{", "=>")),
    LanguageInfo("go", "tree_sitter_go", "language", (".go",), ("go",), ("{",), "//", "\t"),
    LanguageInfo("rust", "tree_sitter_rust", "language", (".rs",), ("rust",), ("{",)),
    LanguageInfo("c", "tree_sitter_c", "language", (".c", ".h"), ("c",), ("{",)),
    LanguageInfo("cpp", "tree_sitter_cpp", "language", (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx"), ("cpp", "cuda-cpp"), ("{",)),
    LanguageInfo("java", "tree_sitter_java", "language", (".java",), ("java",), ("{",)),
)


def uri_path(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme in ("file", "") else uri


def detect(language_id: str, uri: str) -> LanguageInfo | None:
    """By the client's languageId first, else by the file extension; None means plain text."""
    for info in LANGUAGES:
        if language_id in info.language_ids:
            return info
    suffix = PurePosixPath(uri_path(uri)).suffix.lower()
    for info in LANGUAGES:
        if suffix in info.extensions:
            return info
    return None


@lru_cache(maxsize=None)
def grammar(name: str):
    """The tree_sitter.Language for one of LANGUAGES, or None if its wheel is missing."""
    info = next((i for i in LANGUAGES if i.name == name), None)
    if info is None:
        return None
    try:
        import tree_sitter

        module = importlib.import_module(info.module)
        return tree_sitter.Language(getattr(module, info.function)())
    except (ImportError, AttributeError, ValueError) as exc:
        log.warning("no tree-sitter grammar for %s: %s", name, exc)
        return None


def parse(name: str, text: str):
    """A syntax tree for `text`, or None when the language has no grammar here."""
    language = grammar(name)
    if language is None:
        return None
    import tree_sitter

    return tree_sitter.Parser(language).parse(text.encode("utf-8"))
