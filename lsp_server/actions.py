"""Code actions: explain, refactor, add documentation, fix a diagnostic.

The core of it, free of pygls: which code an action is about (the selection, or the function/class around
the cursor, found by tree-sitter), the chat prompt (prompts/actions/*.toml in the model family's chat format,
prompts/chat/*.toml), the model's answer cleaned (code fences, special tokens, trailing chatter), and for
edits the new code re-indented to its place and checked to parse no worse than the code it replaces.

The model runs in the worker's "action" lane: queued behind nothing, but stepping aside between tokens
whenever a completion is waiting (see engine/worker.py), so typing stays fast while an action generates.
"""

from __future__ import annotations

import asyncio
import logging
import re
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from . import languages, postprocess, prompts, redact
from .config import Settings
from .context import document_eol, indent_unit
from .context.syntax import count_errors, parse_bytes, too_big_to_parse
from .engine.client import READY, Job
from .engine.protocol import GenerationRequest, GenerationResult
from .prompts import Segment

log = logging.getLogger(__name__)

KINDS = ("explain", "refactor", "docstring", "fix")
EDIT_KINDS = ("refactor", "docstring", "fix")

# Definitions an action without a selection is about (the innermost one around the cursor).
DEFINITION_TYPES = {
    "function_definition", "class_definition",  # python, c, c++
    "function_declaration", "generator_function_declaration", "method_definition", "class_declaration",  # js/ts
    "abstract_class_declaration", "interface_declaration", "enum_declaration",  # ts/java
    "method_declaration", "constructor_declaration", "record_declaration",  # java, go
    "function_item", "impl_item", "trait_item", "struct_item", "enum_item",  # rust
    "struct_specifier", "class_specifier",  # c/c++
}
# Wrappers that belong to the definition they wrap (decorators, export).
WRAPPER_TYPES = {"decorated_definition", "export_statement", "template_declaration"}
# A variable holding a function (`const f = () => {}`) counts as the function.
FUNCTION_VALUE_TYPES = {"arrow_function", "function_expression", "function", "func_literal"}
HOLDER_TYPES = {"lexical_declaration", "variable_declaration"}

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n`]*\n(.*?)^[ \t]*\1[ \t]*$", re.S | re.M)
_TRAILING_CHATTER = re.compile(
    r"^(let me know|i hope|hope this|feel free|if you have any|this (code|version|refactor)|here is|here's|note:)", re.I
)


class ActionError(Exception):
    """A reason, for the user, why an action gives no result."""


@dataclass(frozen=True)
class ChatTemplate:
    family: str
    template: str
    stop: tuple[str, ...]
    add_bos: bool


@dataclass(frozen=True)
class ActionPrompt:
    kind: str
    title: str
    output: str
    """"markdown" (explain) or "code" (an edit)."""
    max_tokens: int
    system: str
    user: str
    default_instruction: str = ""


def load_chat_templates(directory: Path | None = None) -> dict[str, ChatTemplate]:
    root = directory or prompts.prompts_dir() / "chat"
    out = {}
    for path in sorted(root.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        out[data["family"]] = ChatTemplate(data["family"], data["template"], tuple(data.get("stop", ())), bool(data.get("add_bos")))
    return out


def load_action_prompts(directory: Path | None = None) -> dict[str, ActionPrompt]:
    root = directory or prompts.prompts_dir() / "actions"
    out = {}
    for kind in KINDS:
        data = tomllib.loads((root / f"{kind}.toml").read_text(encoding="utf-8"))
        out[kind] = ActionPrompt(
            kind, data["title"], data["output"], int(data["max_tokens"]), data["system"], data["user"],
            data.get("default_instruction", ""),
        )
    return out


def chat_segments(template: ChatTemplate, system: str, user: str) -> list[Segment]:
    """The template's own text is special (tokenized with the model's special tokens); the values are not,
    so code that contains "<|im_end|>" cannot end a turn. The GGUF's embedded Jinja template is never used."""
    segments: list[Segment] = []
    pos = 0
    for m in re.finditer(r"\$\{(system|user)\}", template.template):
        if m.start() > pos:
            segments.append(Segment(template.template[pos : m.start()], special=True))
        segments.append(Segment(system if m.group(1) == "system" else user))
        pos = m.end()
    if pos < len(template.template):
        segments.append(Segment(template.template[pos:], special=True))
    return segments


# ---- what an action is about ----------------------------------------------------------------------------
@dataclass
class ActionTarget:
    start: int
    """Offset of the first character (always a line start)."""
    end: int
    """Offset after the last character (a line end, before its line break)."""
    text: str
    name: str
    """For titles: "function `area`", "class `Cart`", "lines 3-9"."""

    @property
    def indent(self) -> str:
        return self.text[: len(self.text) - len(self.text.lstrip(" \t"))]


def _line_start(text: str, offset: int) -> int:
    return max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1


def _line_end(text: str, offset: int) -> int:
    ends = [i for i in (text.find("\n", offset), text.find("\r", offset)) if i >= 0]
    return min(ends) if ends else len(text)


def _name_of(node, data: bytes) -> str:
    name = node.child_by_field_name("name")
    if name is None:
        declarator = node.child_by_field_name("declarator")
        while declarator is not None and name is None:
            name = declarator.child_by_field_name("declarator") if declarator.type != "identifier" else declarator
            if name is not None and name.type not in ("identifier", "field_identifier", "qualified_identifier"):
                declarator, name = name, None
    return data[name.start_byte : name.end_byte].decode("utf-8", "replace") if name is not None else ""


def _label(node_type: str) -> str:
    if "class" in node_type or node_type in ("struct_item", "struct_specifier", "impl_item", "trait_item", "enum_item", "record_declaration"):
        return node_type.split("_")[0] if node_type.split("_")[0] in ("struct", "impl", "trait", "enum", "record") else "class"
    if "interface" in node_type:
        return "interface"
    if "enum" in node_type:
        return "enum"
    return "function"


def _char_offset(data: bytes, byte: int) -> int:
    return len(data[:byte].decode("utf-8", "replace"))


def find_target(text: str, language: str | None, sel_start: int, sel_end: int, tree=None) -> ActionTarget | None:
    """The selection (widened to whole lines) when there is one, else the innermost definition around the
    cursor (with its decorators/export). None: nothing to act on (an empty line outside any definition)."""
    if sel_end < sel_start:
        sel_start, sel_end = sel_end, sel_start
    if sel_end > sel_start and text[sel_start:sel_end].strip():
        start = _line_start(text, sel_start)
        end_at = sel_end - 1 if sel_end > sel_start and text[sel_end - 1] in "\r\n" else sel_end
        end = _line_end(text, max(start, end_at))
        first = text.count("\n", 0, start) + 1
        last = text.count("\n", 0, end) + 1
        return ActionTarget(start, end, text[start:end], f"lines {first}-{last}" if last > first else f"line {first}")
    if tree is None or language is None:
        return None
    data = text.encode("utf-8")
    byte = len(text[:sel_start].encode("utf-8"))
    node = tree.root_node.descendant_for_byte_range(byte, byte)
    found = None
    while node is not None:
        if node.type in DEFINITION_TYPES:
            found = node
            break
        if node.type in FUNCTION_VALUE_TYPES and node.parent is not None and node.parent.type == "variable_declarator":
            holder = node.parent.parent
            found = holder if holder is not None and holder.type in HOLDER_TYPES else node
            break
        node = node.parent
    if found is None:
        return None
    name_node = found
    if found.type in HOLDER_TYPES:
        declarator = next((c for c in found.children if c.type == "variable_declarator"), None)
        name_node = declarator or found
    label = _label(found.type if found.type not in HOLDER_TYPES else "function")
    name = _name_of(name_node, data)
    while found.parent is not None and found.parent.type in WRAPPER_TYPES:
        found = found.parent
    start = _line_start(text, _char_offset(data, found.start_byte))
    end = _line_end(text, _char_offset(data, found.end_byte) - 1) if found.end_byte > found.start_byte else start
    return ActionTarget(start, end, text[start:end], f"{label} `{name}`" if name else label)


# ---- prompts and answers --------------------------------------------------------------------------------
def build_request(
    prompt: ActionPrompt, chat: ChatTemplate, target: ActionTarget, *, language: str, path: str, settings: Settings,
    instruction: str = "", diagnostic: dict | None = None, temperature: float = 0.0,
) -> GenerationRequest:
    code = textwrap.dedent(target.text)
    if len(code) > settings.actions.max_code_chars:
        raise ActionError(
            f"the code is {len(code)} characters long; actions take at most {settings.actions.max_code_chars} "
            "(setting actions.maxCodeChars): select a smaller part"
        )
    values = {
        "language": language, "path": path or "untitled", "fence": language if language != "text" else "",
        "code": code, "name": target.name,
        "instruction": instruction.strip() or prompt.default_instruction,
        "diagnostic": (diagnostic or {}).get("message", ""),
        "diagnostic_short": (diagnostic or {}).get("message", "").splitlines()[0][:60] if diagnostic else "",
        "diagnostic_line": str((diagnostic or {}).get("line", 1)),
    }
    system = Template(prompt.system).safe_substitute(values)
    user = Template(prompt.user).safe_substitute(values)
    return GenerationRequest(
        segments=redact.prompt_segments(chat_segments(chat, system, user), path),
        add_bos=chat.add_bos,
        max_tokens=prompt.max_tokens,
        stop=list(chat.stop),
        single_line=False,
        line_rules=False,
        temperature=temperature,
        timeout_s=settings.actions.timeout_s,
        lane="action",
    )


def title(prompt: ActionPrompt, target: ActionTarget, diagnostic: dict | None = None) -> str:
    message = (diagnostic or {}).get("message", "")
    short = message.splitlines()[0][:60] if message else ""
    return "offpilot: " + Template(prompt.title).safe_substitute(name=target.name, diagnostic_short=short)


def clean_markdown(text: str) -> str:
    """The explanation without special tokens, invisible controls or a closing pleasantry."""
    text = postprocess.strip_special_tokens(text).strip()
    paragraphs = re.split(r"\n\s*\n", text)
    while len(paragraphs) > 1 and _TRAILING_CHATTER.match(paragraphs[-1].strip()):
        paragraphs.pop()
    return "\n\n".join(paragraphs).strip()


def cut_at_sentence(markdown: str) -> str:
    """An explanation that ran out of tokens, ended at its last whole paragraph (or sentence) and marked cut."""
    paragraph = markdown.rfind("\n\n")
    sentence = max(markdown.rfind(". "), markdown.rfind(".\n"))
    if paragraph >= len(markdown) // 2:
        markdown = markdown[:paragraph]
    elif sentence >= len(markdown) // 2:
        markdown = markdown[: sentence + 1]
    return markdown.rstrip() + " …"


def extract_code(text: str, context: str = "") -> str | None:
    """The code of the answer: its longest fenced block, or the whole answer when it has no fence and
    reads as code (no prose line before it). None when there is no code."""
    text = postprocess.strip_special_tokens(text, context)  # hidden characters only where the code had them
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    if blocks:
        return max(blocks, key=len).rstrip("\n")
    if "```" in text:  # an opened fence the model never closed: keep what it gave
        after = text.split("```", 1)[1]
        return after.split("\n", 1)[1].rstrip() if "\n" in after else None
    stripped = text.strip("\n")
    return stripped.rstrip() if stripped.strip() else None


def fit_code(code: str, target: ActionTarget, document: str) -> str:
    """The model's code placed where the target was: its first line's indentation, the document's
    indentation step (tabs or spaces) and line endings."""
    code = textwrap.dedent(code.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")
    unit = indent_unit(document)
    if unit == "\t":
        code = postprocess.match_indentation("\n" + code, "\t")[1:]
    base = target.indent
    lines = [(base + line) if line.strip() else "" for line in code.split("\n")]
    return document_eol(document).join(lines)


def parse_errors(language: str | None, text: str, deadline_s: float = 1.0) -> int | None:
    """ERROR/MISSING nodes in the whole text; None when the language has no grammar or the parse ran late."""
    if language is None or languages.grammar(language) is None or too_big_to_parse(text):
        return None
    try:
        tree = parse_bytes(language, text.encode("utf-8"), None, deadline_s)
    except Exception as exc:  # a timeout or a grammar failure: no judgement rather than a wrong one
        log.info("no parse for the action's check: %s", exc)
        return None
    return count_errors(tree.root_node, 0, tree.root_node.end_byte) if tree is not None else None


# ---- running one ------------------------------------------------------------------------------------------
@dataclass
class ActionOutcome:
    kind: str
    markdown: str = ""
    """explain: the explanation."""
    new_text: str = ""
    """Edits: what replaces the target's text."""
    target: ActionTarget | None = None
    attempts: int = 0
    notes: list[str] = field(default_factory=list)


class ActionService:
    """Runs one action against the engine; the LSP side turns the outcome into a WorkspaceEdit or Markdown."""

    def __init__(self, engine, settings: Settings, family_of) -> None:
        self.engine = engine
        self.settings = settings
        self.family_of = family_of
        """Returns the loaded model's family name (the FIM template's), or None."""
        self.prompts = load_action_prompts()
        self.chats = load_chat_templates()

    def chat_template(self) -> ChatTemplate:
        family = self.family_of()
        chat = self.chats.get(family or "")
        if chat is None:
            raise ActionError(f"no chat format for the model family {family!r} (prompts/chat/)")
        return chat

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        job: Job = self.engine.submit(request)
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.engine.cancel(job)  # the client cancelled: stop the model within a token
            raise

    async def run(
        self, kind: str, text: str, language: str | None, path: str, target: ActionTarget,
        instruction: str = "", diagnostic: dict | None = None,
    ) -> ActionOutcome:
        if redact.is_secret_path(path):  # .env, *.pem, id_rsa, ...: no AI features (F10)
            raise ActionError("this looks like a secrets file: offpilot does not send it to the model")
        if self.engine.state != READY:
            raise ActionError(f"the model is {self.engine.state}")
        prompt = self.prompts[kind]
        chat = self.chat_template()
        lang = language or "text"
        outcome = ActionOutcome(kind, target=target)
        errors_before = None
        # A refactor whose result no longer parses where the original did is tried once more with some
        # sampling; if that fails too, no edit is offered (the reason goes to the user).
        temperatures = (0.0,) if prompt.output == "markdown" else (0.0, 0.4)
        for temperature in temperatures:
            outcome.attempts += 1
            request = build_request(prompt, chat, target, language=lang, path=path, settings=self.settings,
                                    instruction=instruction, diagnostic=diagnostic, temperature=temperature)
            result = await self._generate(request)
            if result.finish in ("error", "crashed", "not_ready", "cancelled", "timeout") and not result.text.strip():
                raise ActionError(f"the model gave no answer ({result.finish}{': ' + result.error if result.error else ''})")
            if prompt.output == "markdown":
                outcome.markdown = clean_markdown(result.text)
                if result.finish in ("length", "timeout"):
                    outcome.markdown = cut_at_sentence(outcome.markdown)
                if not outcome.markdown:
                    raise ActionError("the model gave an empty explanation")
                return outcome
            code = extract_code(result.text, target.text)
            if code is None or not code.strip():
                outcome.notes.append(f"attempt {outcome.attempts}: no code in the answer")
                continue
            new_text = fit_code(code, target, text)
            if new_text == target.text:
                outcome.notes.append(f"attempt {outcome.attempts}: the code came back unchanged")
                continue
            loop = asyncio.get_running_loop()
            if errors_before is None:
                errors_before = await loop.run_in_executor(None, parse_errors, language, text)
            after = text[: target.start] + new_text + text[target.end :]
            errors_after = await loop.run_in_executor(None, parse_errors, language, after)
            if errors_before is not None and errors_after is not None and errors_after > errors_before:
                outcome.notes.append(f"attempt {outcome.attempts}: the result does not parse ({errors_after} syntax errors, "
                                     f"{errors_before} before)")
                continue
            outcome.new_text = new_text
            return outcome
        raise ActionError("no usable edit: " + "; ".join(outcome.notes))
