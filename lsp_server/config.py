"""The one typed settings tree: defaults < initializationOptions < workspace/didChangeConfiguration.

Every field has a default and a one-line docstring (the string literal right after it). Invalid values
keep the previous value and produce one warning each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, get_type_hints

log = logging.getLogger(__name__)


@dataclass
class ModelSettings:
    path: str = ""
    """Path to a GGUF file; empty means the installed default model."""
    name: str = ""
    """Name of an installed model (see `offpilot models list`); used when `path` is empty."""
    family: str = "auto"
    """FIM prompt family (qwen2.5-coder, deepseek-coder, starcoder2, codellama, codestral, codegemma) or auto."""
    n_ctx: int = 0
    """Context length of the model in tokens; 0: the hardware plan's choice (4096 on a CPU, up to 16384 on a GPU)."""
    n_threads: int = 0
    """CPU threads for generation; 0 means as many as the OS reports CPUs (os.cpu_count())."""
    n_gpu_layers: int = -1
    """Layers offloaded to the GPU: -1 as many as fit in free VRAM (the hardware plan), 0 none; needs a GPU build of llama-cpp-python."""
    vram_budget_mb: int = 0
    """Most VRAM the plan may use (MiB), headroom included; 0: the GPU's free memory."""
    prefill_chunk_tokens: int = 128
    """Prompt tokens evaluated between two cancellation checks."""
    action_prefill_chunk_tokens: int = 16
    """The same for code actions: a completion that arrives while an action's prompt is evaluated waits for
    the current chunk (16 tokens: ~0.15 s on 2 CPU cores with the 0.5B model)."""
    reuse_kv_cache: bool = True
    """Keep the model's KV cache between requests and evaluate only the prompt tokens after the longest common
    prefix (off: every request evaluates its whole prompt; for measuring)."""
    gpu_oom_retry: bool = True
    """When the model runs out of GPU memory while loading, load it again with half the GPU layers, down to
    CPU only (off: the load fails with a message)."""


@dataclass
class CompletionSettings:
    enabled: bool = True
    """Offer inline completions."""
    max_prompt_tokens: int = 416
    """Budget in model tokens for the whole prompt; the text before the cursor gets what the other parts
    leave. Prompt size is what a cold request costs on a CPU (2 cores: ~100-160 tokens/s for 0.5B)."""
    max_prefix_tokens: int = 416
    """Budget in model tokens for the text before the cursor."""
    prefix_anchor_lines: int = 8
    """The text before the cursor starts at a document line that is a multiple of this, so the window stays
    put while typing and the model's KV cache is reused; 0 cuts as near the budget as possible."""
    max_suffix_tokens: int = 64
    """Budget in model tokens for the text after the cursor."""
    cursor_line_in_middle: bool = False
    """Put the cursor line's text before the cursor at the start of the FIM middle (as if the model had written
    it; its last word is re-spelt by the model, token healing) instead of at the end of the prefix. While the
    user types on a line the prefix and the suffix then stay the same tokens, so only the typed characters are
    evaluated, not the suffix again on every keystroke. Lines longer than 400 characters stay in the prefix.
    Off by default: its quality is not measured on enough holes (the 0.5B model completes `return |` in
    `def add(a, b)` with "n" instead of "a + b" this way)."""
    max_snippet_tokens: int = 96
    """Budget in model tokens for code from other files (imported definitions, recent edits)."""
    max_snippets: int = 4
    """Most snippets from other files in one prompt."""
    parse_deadline_ms: float = 200.0
    """A tree-sitter parse that takes longer is abandoned (the document is handled as plain text)."""
    max_tokens_single_line: int = 48
    """Most tokens generated for a single-line suggestion."""
    max_tokens_multi_line: int = 128
    """Most tokens generated for a multi-line suggestion."""
    max_lines: int = 12
    """Most lines in one multi-line suggestion."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy (deterministic, cache friendly)."""
    prefetch: bool = True
    """After a suggestion, while the model is idle, work out the next one (for the document with the suggestion's
    first line typed or accepted and Enter pressed) into the cache."""
    multi_line_budget_ms: int = 0
    """A multi-line suggestion still generating after this much decoding ends at its next line end (0: no
    limit). Off by default until its cost in quality (scripts/eval_fim.py) is measured."""
    debounce_ms: int = -1
    """Wait this long after a keystroke before starting the model (a newer keystroke meanwhile starts nothing):
    -1 adapts to the typing rhythm and the model's speed (none when answers come faster than keystrokes),
    0 never waits."""
    generation_timeout_s: float = 30.0
    """A generation that takes longer is stopped and answered with what it has."""
    first_line_first: bool = True
    """A multi-line suggestion shows its first line as soon as the model has written it; the rest is generated
    meanwhile and follows as the user types or accepts that line (Enter included)."""
    follow_typing: bool = True
    """A single-line generation still running when the user types more characters keeps running instead of being
    cancelled; when it ends, the newer request gets the rest after what was typed, if the model wrote those
    characters too (else a new generation starts at once). Typing a suggestion's start while the model is still
    writing it then costs nothing."""


@dataclass
class WorkerSettings:
    restart_backoff_initial_s: float = 1.0
    """Delay before the first restart of a crashed model worker."""
    restart_backoff_max_s: float = 60.0
    """Longest delay between restarts of a crashing model worker."""
    load_timeout_s: float = 300.0
    """A model load that takes longer counts as a failed start."""
    hang_timeout_s: float = 10.0
    """A generation that makes no progress (no token, no prompt chunk) for this long means the worker hangs: it
    is killed and restarted, and the request answered; 0 never."""


@dataclass
class CacheSettings:
    enabled: bool = True
    """Reuse the model's answer for a prompt seen before, and serve the rest of a shown suggestion while it is typed."""
    memory_entries: int = 512
    """Answers kept in memory (least recently used go first)."""
    disk: bool = True
    """Keep answers on disk too, so they survive a restart (JSON text in a private folder)."""
    disk_limit_mb: int = 64
    """Size limit of the disk cache in MiB."""
    directory: str = ""
    """Folder of the disk cache; empty: $OFFPILOT_CACHE_DIR, else $XDG_CACHE_HOME/offpilot/completions."""


@dataclass
class ActionSettings:
    enabled: bool = True
    """Offer code actions (explain, refactor, add docstring/comments, fix a diagnostic)."""
    max_code_chars: int = 12000
    """Most characters of code one action sends to the model; a larger selection is refused with a message."""
    timeout_s: float = 300.0
    """An action's generation that takes longer is stopped (it steps aside for completions meanwhile)."""
    show_document: bool = True
    """Explain also opens the explanation as a read-only Markdown file (window/showDocument), for clients that
    do not show the command's result themselves (the offpilot VS Code and Neovim clients turn this off)."""


@dataclass
class PrivacySettings:
    secret_files: str = ""
    """More file-name globs, comma-separated (e.g. "*.secret.yaml, vault.json"), whose files get no AI features and
    serve as no context, besides the built-in ones (.env*, *.pem, *.key, id_rsa*, .npmrc, .pypirc, *.p12, ...)."""


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    """The GGUF model and how it runs."""
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    """Inline completion."""
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    """The model worker process."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    """The response cache."""
    actions: ActionSettings = field(default_factory=ActionSettings)
    """Code actions."""
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    """What never reaches the model."""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _coerce(value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    raise TypeError(f"unsupported type {typ}")


def _check(section: str, name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        allowed_negative = {("model", "n_gpu_layers"), ("completion", "debounce_ms")}  # -1: automatic
        if value < 0 and (section, name) not in allowed_negative:
            raise ValueError(f"must not be negative, got {value}")


def merge(settings: Settings, overrides: Any, *, source: str) -> list[str]:
    """Apply a (possibly camelCase, possibly partial) dict onto `settings` in place.

    Returns the warnings; each bad value keeps the previous one.
    """
    warnings: list[str] = []
    if overrides is None:
        return warnings
    if not isinstance(overrides, dict):
        warnings.append(f"{source}: settings must be an object, got {type(overrides).__name__}")
        return warnings
    if isinstance(overrides.get("offpilot"), dict):
        overrides = overrides["offpilot"]
    for section_key, section_value in overrides.items():
        section_name = _snake(str(section_key))
        if not any(f.name == section_name for f in dataclasses.fields(settings)):
            warnings.append(f"{source}: unknown setting {section_key!r}")
            continue
        section = getattr(settings, section_name)
        if not isinstance(section_value, dict):
            warnings.append(f"{source}: {section_key} must be an object")
            continue
        hints = get_type_hints(type(section))
        for key, value in section_value.items():
            name = _snake(str(key))
            if name not in hints:
                warnings.append(f"{source}: unknown setting {section_key}.{key}")
                continue
            try:
                coerced = _coerce(value, hints[name])
                _check(section_name, name, coerced)
            except (TypeError, ValueError) as exc:
                warnings.append(f"{source}: {section_key}.{key} {exc}; keeping {getattr(section, name)!r}")
                continue
            setattr(section, name, coerced)
    for w in warnings:
        log.warning("%s", w)
    return warnings


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings of a settings dataclass's fields (for the generated client schema)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = str(following.value.value)
    return docs


def settings_table() -> str:
    """The settings as a Markdown table (name as clients send it, default, meaning): the README's copy
    is checked against this by the tests."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    defaults = Settings()
    for section in dataclasses.fields(Settings):
        value = getattr(defaults, section.name)
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            name = f"{_camel(section.name)}.{_camel(f.name)}"
            default = json.dumps(getattr(value, f.name))
            meaning = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
            rows.append(f"| `{name}` | `{default}` | {meaning} |")
    return "\n".join(rows) + "\n"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


if __name__ == "__main__":  # `python -m lsp_server.config` prints the README's settings table
    print(settings_table(), end="")  # stdout-ok: a command-line tool, not the server
