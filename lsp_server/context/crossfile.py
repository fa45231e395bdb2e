"""Code from other files for the prompt: definitions of what this file imports, and recent edits.

Other files come from the open documents first; files on disk are read only inside the workspace
folders (where the opened file really is, after every symlink: a link that leads out is not followed),
only regular files (a FIFO would block the read), never when they look like secrets (by the link's name
or the target's), and never over `MAX_FILE_BYTES`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from .. import languages
from ..languages import uri_path
from ..redact import is_secret_path, is_secret_uri
from .syntax import parse_bytes

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 256 * 1024
MAX_DEFINITION_LINES = 12

_DEFINITION_TYPES = {
    "python": ("function_definition", "class_definition", "decorated_definition", "expression_statement"),
    "javascript": ("function_declaration", "class_declaration", "lexical_declaration", "export_statement", "variable_declaration"),
    "typescript": ("function_declaration", "class_declaration", "lexical_declaration", "export_statement", "interface_declaration", "type_alias_declaration"),
    "tsx": ("function_declaration", "class_declaration", "lexical_declaration", "export_statement", "interface_declaration", "type_alias_declaration"),
}
_JS_EXTENSIONS = (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs", "/index.ts", "/index.js")


@dataclass(frozen=True)
class Snippet:
    path: str
    """Shown to the model: relative to the workspace when possible."""
    text: str


class RecentEdits:
    """A small ring of recently edited regions (deduplicated by document and line range)."""

    def __init__(self, capacity: int = 8, radius_lines: int = 6) -> None:
        self.capacity = capacity
        self.radius_lines = radius_lines
        self._ring: OrderedDict[tuple[str, int], None] = OrderedDict()

    def record(self, uri: str, line: int) -> None:
        bucket = line // (self.radius_lines * 2)  # nearby edits share one region
        key = (uri, bucket)
        self._ring.pop(key, None)
        self._ring[key] = None
        while len(self._ring) > self.capacity:
            self._ring.popitem(last=False)

    def forget(self, uri: str) -> None:
        for key in [k for k in self._ring if k[0] == uri]:
            del self._ring[key]

    def snippets(self, texts: dict[str, str], exclude_uri: str, relative) -> list[Snippet]:
        out = []
        for uri, bucket in reversed(self._ring):
            if uri == exclude_uri or uri not in texts or is_secret_uri(uri):
                continue
            lines = texts[uri].split("\n")
            start = bucket * self.radius_lines * 2
            chunk = "\n".join(lines[max(0, start - 2) : start + self.radius_lines * 2 + 2]).strip("\n")
            if chunk.strip():
                out.append(Snippet(relative(uri), chunk))
        return out


@functools.lru_cache(maxsize=1)
def _python_top_level_query():
    import tree_sitter

    language = languages.grammar("python")
    if language is None:
        return None
    cursor = tree_sitter.QueryCursor(tree_sitter.Query(language, "[(import_from_statement) (if_statement) (try_statement)] @n"))
    cursor.set_max_start_depth(1)
    return cursor


def _python_imports(root, data: bytes) -> list[tuple[str, list[str]]]:
    """(module, [names]) for `from module import a, b` (relative modules keep their dots), at the top level
    and inside top-level if/try blocks, in file order.

    A depth-limited tree-sitter query picks the top-level candidates in C: walking a 5,000-function
    module's children from Python cost ~2 ms per keystroke, an unlimited query ~20 ms."""
    cursor = _python_top_level_query()
    if cursor is None:
        return []
    out = []
    stack = sorted(cursor.captures(root).get("n", []), key=lambda n: n.start_byte, reverse=True)
    while stack:
        node = stack.pop()
        if node.type == "import_from_statement":
            module = node.child_by_field_name("module_name")
            names = [n.text.decode() for n in node.children_by_field_name("name")]
            names = [n.split(" as ")[0].strip() for n in names]
            if module is not None:
                out.append((module.text.decode(), names))
        elif node.type in ("block", "if_statement", "try_statement", "else_clause", "elif_clause", "except_clause",
                           "finally_clause"):
            stack.extend(reversed(node.children))
    return out


def _require(node) -> tuple[str, list[str]] | None:
    """`const {a, b: c} = require('./m')` → ('./m', ['a', 'b']); `const m = require('./m')` → ('./m', ['*'])."""
    value = node.child_by_field_name("value")
    name = node.child_by_field_name("name")
    if value is None or name is None or value.type != "call_expression":
        return None
    function = value.child_by_field_name("function")
    arguments = value.child_by_field_name("arguments")
    if function is None or function.text != b"require" or arguments is None or not arguments.named_children:
        return None
    source = arguments.named_children[0]
    if source.type != "string":
        return None
    module = source.text.decode().strip("'\"`")
    if name.type == "identifier":
        return module, ["*"]
    names = []
    for child in name.named_children:
        if child.type == "shorthand_property_identifier_pattern":
            names.append(child.text.decode())
        elif child.type == "pair_pattern" and child.child_by_field_name("key") is not None:
            names.append(child.child_by_field_name("key").text.decode())
    return module, names


def _js_imports(root, data: bytes) -> list[tuple[str, list[str]]]:
    out = []
    for node in root.children:
        if node.type in ("lexical_declaration", "variable_declaration"):
            for declarator in node.named_children:
                found = _require(declarator)
                if found:
                    out.append(found)
            continue
        if node.type != "import_statement":
            continue
        source = node.child_by_field_name("source")
        if source is None:
            continue
        module = source.text.decode().strip("'\"`")
        names = []
        stack = [node]
        while stack:
            n = stack.pop()
            if n.type in ("import_specifier",):
                name = n.child_by_field_name("name")
                if name is not None:
                    names.append(name.text.decode())
            elif n.type == "identifier" and n.parent is not None and n.parent.type == "import_clause":
                names.append(n.text.decode())  # default import
            stack.extend(n.children)
        out.append((module, names))
    return out


def _definition_name(node) -> str | None:
    target = node
    if node.type in ("decorated_definition", "export_statement") and node.named_children:
        target = node.child_by_field_name("definition") or node.child_by_field_name("declaration") or node.named_children[-1]
    name = target.child_by_field_name("name")
    if name is not None:
        return name.text.decode()
    if target.type in ("lexical_declaration", "variable_declaration"):
        for child in target.named_children:
            n = child.child_by_field_name("name")
            if n is not None:
                return n.text.decode()
    if target.type == "expression_statement" and target.named_children:
        assign = target.named_children[0]
        left = assign.child_by_field_name("left")
        if left is not None and left.type == "identifier":
            return left.text.decode()
    return None


def top_level_definitions(language: str, text: str) -> dict[str, str]:
    """name -> the definition's first lines, for the top-level definitions of a file."""
    data = text.encode("utf-8", "surrogatepass")
    tree = parse_bytes(language, data, deadline_s=0.2)
    if tree is None:
        return {}
    types = _DEFINITION_TYPES.get(language, ())
    out: dict[str, str] = {}
    for node in tree.root_node.children:
        if node.type not in types:
            continue
        name = _definition_name(node)
        if name and name not in out:
            lines = data[node.start_byte : node.end_byte].decode("utf-8", "replace").split("\n")
            body = lines[:MAX_DEFINITION_LINES]
            if len(lines) > MAX_DEFINITION_LINES:
                body.append("    ..." if language == "python" else "  // ...")
            out[name] = "\n".join(body)
    return out


class CrossFileContext:
    """Finds the definitions that a document imports, in open documents and workspace files."""

    def __init__(self) -> None:
        self.roots: list[Path] = []
        self._definitions: dict[tuple[str, object], dict[str, str]] = {}

    def relative(self, uri: str) -> str:
        path = uri_path(uri)
        for root in self.roots:
            try:
                return str(Path(path).relative_to(root))
            except ValueError:
                continue
        return os.path.basename(path)

    def _inside_workspace(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved == r or r in resolved.parents for r in self.roots)

    def _read(self, path: Path, open_texts: dict[str, str]) -> tuple[str, object] | None:
        if is_secret_path(str(path)):
            return None
        uri = path.as_uri()
        if uri in open_texts:
            return open_texts[uri], ("open", hash(open_texts[uri]))
        if not self.roots or not self._inside_workspace(path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode) or stat.st_size > MAX_FILE_BYTES:
                return None
            # What was opened, not what the name said a moment ago: a link swapped in meanwhile is caught here.
            real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else path.resolve()
            if is_secret_path(str(real)) or not any(real == r or r in real.parents for r in self.roots):
                return None
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
            return data.decode("utf-8"), ("disk", stat.st_mtime_ns, stat.st_size)
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)

    def _module_candidates(self, language: str, current: Path, module: str) -> list[Path]:
        if language == "python":
            dots = len(module) - len(module.lstrip("."))
            parts = [p for p in module.lstrip(".").split(".") if p]
            if dots:
                base = current.parent
                for _ in range(dots - 1):
                    base = base.parent
                bases = [base]
            else:
                bases = [current.parent] + self.roots
            out = []
            for base in bases:
                target = base.joinpath(*parts) if parts else base
                out += [target.with_suffix(".py") if parts else target / "__init__.py", target / "__init__.py"]
            return out
        if module.startswith("."):
            target = (current.parent / module)
            return [Path(str(target) + ext) for ext in ("",) + _JS_EXTENSIONS]
        return []

    def import_snippets(self, uri: str, language: str, tree, data: bytes, open_texts: dict[str, str]) -> list[Snippet]:
        if tree is None or language not in _DEFINITION_TYPES:
            return []
        imports = _python_imports(tree.root_node, data) if language == "python" else _js_imports(tree.root_node, data)
        current = Path(uri_path(uri))
        picked: dict[str, dict[str, str]] = {}  # file -> name -> definition, in import order
        for module, names in imports:
            for candidate in self._module_candidates(language, current, module):
                definitions = self._definitions_of(candidate, language, open_texts)
                if definitions is None:
                    continue
                chosen = picked.setdefault(self.relative(candidate.as_uri()), {})
                wanted = list(definitions)[:3] if "*" in names else names  # a whole-module import
                for name in wanted:
                    if name in definitions:
                        chosen.setdefault(name, definitions[name])
                break
        return [Snippet(path, "\n\n".join(defs.values())) for path, defs in picked.items() if defs]

    def _definitions_of(self, path: Path, language: str, open_texts: dict[str, str]) -> dict[str, str] | None:
        found = self._read(path, open_texts)
        if found is None:
            return None
        text, stamp = found
        key = (str(path), stamp)
        definitions = self._definitions.get(key)
        if definitions is None:
            target = languages.detect("", path.as_uri())
            definitions = top_level_definitions(target.name if target else language, text)
            self._definitions[key] = definitions
            if len(self._definitions) > 256:
                self._definitions.pop(next(iter(self._definitions)))
        return definitions
