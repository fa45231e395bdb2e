"""Tree-sitter: incremental trees per document, parsing with a deadline, and what the tree says about a
cursor (suggest or not, a line or a block, the enclosing scope) and about a suggestion (does it parse).

Byte offsets: tree-sitter works in UTF-8 bytes; the rest of the server in code points. `Source` keeps
both so conversions happen once per request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import languages

log = logging.getLogger(__name__)

# Node types that open a scope whose first line is worth keeping in the prompt ("header").
SCOPE_TYPES = {
    "function_definition", "class_definition", "decorated_definition",  # python
    "function_declaration", "function_expression", "arrow_function", "method_definition", "class_declaration",
    "generator_function_declaration", "class",  # js/ts
    "interface_declaration", "enum_declaration", "abstract_class_declaration",  # ts/java
    "method_declaration", "func_literal", "type_declaration",  # go/java
    "function_item", "impl_item", "trait_item", "struct_item", "enum_item", "mod_item",  # rust
    "function_definition", "struct_specifier", "class_specifier", "namespace_definition",  # c/c++
    "constructor_declaration",  # java
}
COMMENT_TYPES = ("comment", "line_comment", "block_comment")
STRING_TYPES = ("string", "string_content", "template_string", "raw_string_literal", "string_literal",
                "interpreted_string_literal", "char_literal", "character_literal", "string_fragment")


class ParseTimeout(Exception):
    """The parse ran past its deadline; callers degrade to no-tree mode."""


def parse_bytes(name: str, data: bytes, old_tree=None, deadline_s: float | None = None):
    """Parse with an optional deadline (tree-sitter's progress callback); raises ParseTimeout."""
    language = languages.grammar(name)
    if language is None:
        return None
    import tree_sitter

    parser = tree_sitter.Parser(language)
    if deadline_s is None:
        return parser.parse(data, old_tree) if old_tree is not None else parser.parse(data)
    stop_at = time.monotonic() + deadline_s

    returned: list[bytes] = []

    def read(byte: int, _point) -> bytes:
        chunk = data[byte : byte + 65536]
        returned.append(chunk)
        return chunk

    def progress(_offset: int, _has_error: bool) -> bool:
        return time.monotonic() > stop_at

    try:
        if old_tree is None:
            return parser.parse(read, progress_callback=progress)
        return parser.parse(read, old_tree, progress_callback=progress)
    except ValueError as exc:  # tree-sitter reports a halted parse this way
        raise ParseTimeout(f"{name}: parse took over {deadline_s * 1000:.0f} ms") from exc
    finally:
        _release_read_chunks(returned)


_READ_LEAKS: bool | None = None


def _release_read_chunks(chunks: list[bytes]) -> None:
    """py-tree-sitter 0.26.1 keeps one reference to every bytes object a read callback returns, so each parse
    leaked a copy of the document (soak: +23 MB server RSS over 10,000 edits; 3,000 parses of a 5.6 KB file:
    +14 MB). Once the parse is over, give those references back, if (probed once) this tree-sitter leaks."""
    global _READ_LEAKS
    if _READ_LEAKS is None:
        _READ_LEAKS = _probe_read_leak()
    if _READ_LEAKS:
        import ctypes

        for chunk in chunks:
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(chunk))


def _probe_read_leak() -> bool:
    import sys

    import tree_sitter

    language = languages.grammar("python")
    if language is None:
        return False
    chunk = bytes(bytearray(b"x = 1\n"))  # a fresh object: no interning, no other owner

    def read(byte: int, _point) -> bytes:
        return chunk if byte == 0 else bytes(bytearray())

    before = sys.getrefcount(chunk)
    tree_sitter.Parser(language).parse(read, progress_callback=lambda _offset, _error: False)
    leaked = sys.getrefcount(chunk) - before
    if leaked > 0:
        import ctypes

        for _ in range(leaked):
            ctypes.pythonapi.Py_DecRef(ctypes.py_object(chunk))
    return leaked == 1


def _point_at(data: bytes, byte: int) -> tuple[int, int]:
    row = data.count(b"\n", 0, byte)
    col = byte - (data.rfind(b"\n", 0, byte) + 1)
    return row, col


def _common_prefix_len(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on slice equality: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix_len(a: bytes, b: bytes, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def edit_tree(tree, old: bytes, new: bytes):
    """Tell `tree` (parsed from `old`) about the one changed span between `old` and `new`."""
    start = _common_prefix_len(old, new)
    tail = _common_suffix_len(old, new, min(len(old), len(new)) - start)
    old_end, new_end = len(old) - tail, len(new) - tail
    tree.edit(
        start_byte=start,
        old_end_byte=old_end,
        new_end_byte=new_end,
        start_point=_point_at(old, start),
        old_end_point=_point_at(old, old_end),
        new_end_point=_point_at(new, new_end),
    )
    return tree


@dataclass
class _Entry:
    language: str
    data: bytes
    tree: object


class TreeCache:
    """The last tree of each document, so the next parse is incremental (only the edited span)."""

    def __init__(self, max_documents: int = 64) -> None:
        self._entries: dict[str, _Entry] = {}
        self.max_documents = max_documents

    def parse(self, key: str, language: str, data: bytes, deadline_s: float | None):
        entry = self._entries.get(key)
        old_tree = None
        if entry is not None and entry.language == language:
            if entry.data == data:
                return entry.tree
            # Edit a copy: if the parse fails or runs late, the cached tree must still match its bytes (an
            # edited tree next to the old bytes would get the next edit applied on top of this one).
            old_tree = edit_tree(entry.tree.copy(), entry.data, data)
        try:
            tree = parse_bytes(language, data, old_tree, deadline_s)
        except BaseException:
            self._entries.pop(key, None)
            raise
        if tree is not None:
            self._entries.pop(key, None)
            self._entries[key] = _Entry(language, data, tree)
            while len(self._entries) > self.max_documents:
                self._entries.pop(next(iter(self._entries)))
        return tree

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)


def error_nodes(node, start_byte: int, end_byte: int):
    """ERROR and MISSING nodes that intersect [start_byte, end_byte), skipping error-free subtrees."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.end_byte < start_byte or n.start_byte > end_byte:
            continue
        if n.is_error or n.is_missing:
            yield n
        if n.has_error:
            stack.extend(n.children)


def count_errors(node, start_byte: int, end_byte: int) -> int:
    return sum(1 for _ in error_nodes(node, start_byte, end_byte))


def scope_range(root, byte: int) -> tuple[int, int]:
    """The top-level nodes around `byte`: the one containing it, or the ones before and after it."""
    before = after = None
    for child in root.children:
        if child.end_byte < byte:
            before = child
        elif child.start_byte > byte:
            after = child
            break
        else:
            return child.start_byte, child.end_byte
    start = before.start_byte if before is not None else 0
    end = after.end_byte if after is not None else root.end_byte
    return start, end


def node_at(root, byte: int):
    """The smallest node that covers the cursor (looking left of it when it sits at a boundary)."""
    left = max(0, byte - 1)
    return root.descendant_for_byte_range(left, byte)


def inside(node, types: tuple[str, ...]) -> bool:
    while node is not None:
        if node.type in types or any(t in node.type for t in types):
            return True
        node = node.parent
    return False


def enclosing_headers(root, byte: int, data: bytes, indent_scoped: bool) -> list[tuple[int, bytes]]:
    """(start byte, first line) of each scope that encloses the cursor, outermost first.

    In an indentation-scoped language a scope's node ends at its last statement, so a cursor on the
    blank line below still belongs to it when it is indented further than the scope's first line."""
    if indent_scoped:
        anchor = len(data[:byte].rstrip())
        node = root.descendant_for_byte_range(max(0, anchor - 1), max(0, anchor - 1))
        line_start = data.rfind(b"\n", 0, byte) + 1
        line = data[line_start:byte]
        cursor_indent = len(line) - len(line.lstrip()) if line.strip() == b"" else len(line) - len(line.lstrip()) + 1
    else:
        node = root.descendant_for_byte_range(byte, byte)
        cursor_indent = None
    headers = []
    while node is not None:
        if node.type in SCOPE_TYPES and node.start_byte < byte:
            start = data.rfind(b"\n", 0, node.start_byte) + 1
            end = data.find(b"\n", node.start_byte)
            first_line = data[start : len(data) if end == -1 else end]
            indent = len(first_line) - len(first_line.lstrip())
            if cursor_indent is None or indent < cursor_indent:
                headers.append((start, first_line))
        node = node.parent
    headers.reverse()
    return headers


_PLACEHOLDER = b"__offpilot_hole__"


def hole_at(language: str, tree, data: bytes, byte: int, deadline_s: float) -> bool:
    """The grammar says something is missing at the cursor: an identifier put there parses better."""
    root = tree.root_node
    start, end = scope_range(root, byte)
    before = count_errors(root, start, end)
    if before == 0:
        return False
    patched = data[:byte] + _PLACEHOLDER + data[byte:]
    edited = tree.copy()
    point = _point_at(data, byte)
    edited.edit(
        start_byte=byte, old_end_byte=byte, new_end_byte=byte + len(_PLACEHOLDER),
        start_point=point, old_end_point=point, new_end_point=(point[0], point[1] + len(_PLACEHOLDER)),
    )
    try:
        new_tree = parse_bytes(language, patched, edited, deadline_s)
    except ParseTimeout:
        return False
    return new_tree is not None and count_errors(new_tree.root_node, start, end + len(_PLACEHOLDER)) < before


@dataclass
class SyntaxFacts:
    """What the tree says about one cursor; `tree`/`data` are kept for checking the suggestion."""

    language: str
    tree: object
    data: bytes
    cursor_byte: int
    in_comment: bool
    in_string: bool
    hole_at_cursor: bool
    headers: list[str]
    """First lines of the scopes enclosing the cursor, outermost first."""
    header_offset: int
    """Character offset where the outermost header's line starts (-1 when there is none)."""
    head_tree: object = None
    """The tree of the document's head, where imports live (the same as `tree` when that covers it)."""
    head_data: bytes = b""


WINDOW_MIN_CHARS = 24_000
"""Documents longer than this are parsed in a window around the cursor: the tree-sitter Python grammar
reparses everything after an edit (its indentation scanner's state blocks subtree reuse), measured 46 ms
per keystroke near the top of a 5,000-line file; the decisions only need the enclosing definition."""
WINDOW_MAX_LINES = 400
"""At most this many lines before and after the cursor's line (the window ends sooner at the enclosing
top-level definition's boundaries)."""
HEAD_CHARS = 8_000
"""The head of a windowed document, parsed separately for its imports (cached while it does not change)."""


def _top_level_start(line: str) -> bool:
    """A line that starts a top-level construct: text in column 0 that does not close a bracket."""
    return bool(line) and not line[0].isspace() and line[0] not in ")]}"


def analysis_window(text: str, offset: int) -> tuple[int, int]:
    """[start, end) in characters: from the last top-level start at or before the cursor's line to the
    next one after it, each at most WINDOW_MAX_LINES lines away; the whole text when it is short."""
    if len(text) <= WINDOW_MIN_CHARS:
        return 0, len(text)
    line_start = text.rfind("\n", 0, offset) + 1
    start = line_start
    for _ in range(WINDOW_MAX_LINES):
        if start == 0 or _top_level_start(text[start : start + 1]):
            break
        start = text.rfind("\n", 0, start - 1) + 1
    end = text.find("\n", offset)
    for _ in range(WINDOW_MAX_LINES):
        if end < 0:
            return start, len(text)
        if _top_level_start(text[end + 1 : end + 2]):
            return start, end + 1
        end = text.find("\n", end + 1)
    return start, len(text) if end < 0 else end + 1


def analyze(
    cache: TreeCache, key: str, language: str, text: str, offset: int, deadline_s: float, check_hole: bool = False
) -> SyntaxFacts | None:
    stop_at = time.monotonic() + deadline_s  # one deadline for all the parses of one request
    window_start, window_end = analysis_window(text, offset)
    windowed = (window_start, window_end) != (0, len(text))
    window = text[window_start:window_end] if windowed else text
    data = window.encode("utf-8", "surrogatepass")
    cursor = len(window[: offset - window_start].encode("utf-8", "surrogatepass"))
    tree = cache.parse(f"{key}#window" if windowed else key, language, data, deadline_s)
    if tree is None:
        return None
    head_tree, head_data = tree, data
    if windowed and window_start > 0:
        head_end = text.rfind("\n", 0, HEAD_CHARS) + 1 or min(len(text), HEAD_CHARS)
        head_data = text[:head_end].encode("utf-8", "surrogatepass")
        head_tree = cache.parse(f"{key}#head", language, head_data, max(0.01, stop_at - time.monotonic()))
    root = tree.root_node
    node = node_at(root, cursor)
    headers = enclosing_headers(root, cursor, data, indent_scoped=language == "python")
    header_offset = window_start + len(data[: headers[0][0]].decode("utf-8", "replace")) if headers else -1
    return SyntaxFacts(
        language=language,
        tree=tree,
        data=data,
        cursor_byte=cursor,
        in_comment=inside(node, COMMENT_TYPES),
        in_string=inside(node, STRING_TYPES),
        hole_at_cursor=check_hole and hole_at(language, tree, data, cursor, max(0.01, stop_at - time.monotonic())),
        headers=[h.decode("utf-8", "replace") for _, h in headers],
        header_offset=header_offset,
        head_tree=head_tree,
        head_data=head_data,
    )


def _cut_points(suggestion: str) -> list[str]:
    """Candidate prefixes of a suggestion, longest first: whole lines, then token ends in the first line."""
    lines = suggestion.split("\n")
    candidates = ["\n".join(lines[:n]).rstrip() for n in range(len(lines), 0, -1)]
    first = lines[0]
    boundaries = sorted({i for i in range(1, len(first)) if (first[i - 1].isalnum() or first[i - 1] == "_") != (first[i].isalnum() or first[i] == "_") or not first[i].isalnum()}, reverse=True)
    candidates += [first[:i].rstrip() for i in boundaries]
    seen: dict[str, None] = {}
    for c in candidates:
        if c.strip():
            seen.setdefault(c, None)
    return list(seen)


def error_signatures(node, start_byte: int, end_byte: int, insert_at: int, inserted: int) -> list[tuple[str, int]]:
    """(kind, start) of the ERROR/MISSING nodes in a range, starts mapped back to the text before an
    insertion of `inserted` bytes at `insert_at` (-1 for an error inside the inserted text)."""
    out = []
    for n in error_nodes(node, start_byte, end_byte):
        s = n.start_byte
        if inserted and insert_at <= s < insert_at + inserted or (n.is_error and s < insert_at < n.end_byte):
            mapped = -1
        else:
            mapped = s - inserted if s >= insert_at + inserted else s
        out.append(("MISSING " + n.type if n.is_missing else "ERROR", mapped))
    return sorted(out)


UNPARSED_SCOPE_ERRORS = 3
"""A top-level scope with this many ERROR/MISSING nodes before the suggestion is beyond the grammar."""


def syntax_trim(facts: SyntaxFacts, suggestion: str, deadline_s: float, max_parses: int = 24) -> str:
    """The longest prefix of `suggestion` (cut at line or token boundaries) that, inserted at the cursor,
    does not make the enclosing scope parse worse: it leaves fewer ERROR/MISSING nodes than before, or
    exactly the same ones and none over the inserted text (one error must not be traded for another).
    Returns "" when no prefix passes; returns the suggestion unchanged when the check runs out of time."""
    root = facts.tree.root_node
    scope_start, scope_end = scope_range(root, facts.cursor_byte)
    if count_errors(root, scope_start, scope_end) >= UNPARSED_SCOPE_ERRORS:
        # The grammar does not understand this code (macros it cannot expand, a dialect): its verdict on
        # the suggestion would be noise, and correct text would be thrown away. Keep the model's text.
        log.debug("syntax check skipped: the scope already has %d+ parse errors", UNPARSED_SCOPE_ERRORS)
        return suggestion
    # From the enclosing top-level scope to the end of the file: a brace the suggestion leaves open
    # shows up as a MISSING node at the very end.
    start, end = scope_start, len(facts.data)
    baseline = error_signatures(root, start, end, facts.cursor_byte, 0)
    stop_at = time.monotonic() + deadline_s
    cursor = facts.cursor_byte
    row, col = _point_at(facts.data, cursor)
    for parses, candidate in enumerate(_cut_points(suggestion)):
        remaining = stop_at - time.monotonic()
        if parses >= max_parses or remaining <= 0:
            log.debug("syntax check ran out of budget after %d parses", parses)
            return suggestion
        inserted = candidate.encode("utf-8", "surrogatepass")
        data = facts.data[:cursor] + inserted + facts.data[cursor:]
        tree = facts.tree.copy()
        tree.edit(
            start_byte=cursor, old_end_byte=cursor, new_end_byte=cursor + len(inserted),
            start_point=(row, col), old_end_point=(row, col), new_end_point=_point_at(data, cursor + len(inserted)),
        )
        try:
            new_tree = parse_bytes(facts.language, data, tree, remaining)
        except ParseTimeout:
            return suggestion
        if new_tree is None:
            continue
        after = error_signatures(new_tree.root_node, start, end + len(inserted), cursor, len(inserted))
        if len(after) < len(baseline) or after == baseline:
            return candidate
    return ""


MAX_DOCUMENT_BYTES = 2_000_000
MAX_DOCUMENT_LINES = 50_000
HANG_GRACE_S = 0.25
"""A parse job still running this long after its deadline is taken as hung: the request goes on without a tree
within 300 ms of the deadline (reliability.md C7)."""
MAX_HANGS = 5
"""After this many hung parses in a row tree-sitter stays off for the session (each leaves a thread behind)."""


def too_big_to_parse(text: str, max_bytes: int = MAX_DOCUMENT_BYTES, max_lines: int = MAX_DOCUMENT_LINES) -> bool:
    """Over 2 MB or 50,000 lines: no tree (plain-text mode); the prompt is windowed around the cursor anyway."""
    if len(text) > max_bytes:
        return True
    if len(text) > max_bytes // 4 and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        return True
    return len(text) >= max_lines and text.count("\n") + text.count("\r") - text.count("\r\n") >= max_lines


class _ParseThread:
    """One daemon thread running parse jobs in order. Not a ThreadPoolExecutor: its threads are joined at
    interpreter exit, so a parse hung in a grammar would keep the server from exiting."""

    def __init__(self) -> None:
        import queue
        import threading

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="offpilot-parse", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)


class SyntaxService:
    """Parsing off the event loop: one thread (a tree-sitter parser is not shared across threads), each
    parse bounded by a deadline (tree-sitter's progress callback); over-large documents get no tree
    (plain-text mode). A job that overruns its deadline by HANG_GRACE_S (a grammar stuck where the progress
    callback is never called) is abandoned: the request goes on without a tree, a fresh thread takes over,
    and parsing pauses with back-off (1 s, 2 s, ... 60 s); after MAX_HANGS in a row it stays off."""

    def __init__(self, deadline_ms: float = 200.0, max_document_bytes: int = MAX_DOCUMENT_BYTES,
                 max_document_lines: int = MAX_DOCUMENT_LINES) -> None:
        self.deadline_s = deadline_ms / 1000.0
        self.max_document_bytes = max_document_bytes
        self.max_document_lines = max_document_lines
        self.cache = TreeCache()
        self._worker = _ParseThread()
        self.hangs = 0
        self._hangs_in_a_row = 0
        self._paused_until = 0.0
        self._backoff_s = 1.0

    def usable(self, language: str, text: str) -> bool:
        if languages.grammar(language) is None or self._hangs_in_a_row >= MAX_HANGS or time.monotonic() < self._paused_until:
            return False
        return not too_big_to_parse(text, self.max_document_bytes, self.max_document_lines)

    async def _run(self, key: str, fn, *args):
        """fn(*args) on the parse thread; None when it runs late, hangs or times out (no-tree mode)."""
        import asyncio

        future = asyncio.wrap_future(self._worker.submit(fn, *args))
        try:
            result = await asyncio.wait_for(future, self.deadline_s + HANG_GRACE_S)
            self._hangs_in_a_row, self._backoff_s = 0, 1.0  # a late thread on a busy machine is not a broken grammar
            return result
        except ParseTimeout as exc:  # slow, not hung: the thread answered
            self._hangs_in_a_row, self._backoff_s = 0, 1.0
            log.info("no syntax tree: %s", exc)
            self.forget(key)
            return None
        except asyncio.TimeoutError:
            self._hung(key)
            return None

    def _hung(self, key: str) -> None:
        self.hangs += 1
        self._hangs_in_a_row += 1
        old, self._worker = self._worker, _ParseThread()
        old.stop()
        self._paused_until = time.monotonic() + self._backoff_s
        log.warning("a parse of %s ran %.0f ms past its deadline: no syntax tree, parsing paused for %.0f s%s", key,
                    HANG_GRACE_S * 1000, self._backoff_s, " and now off for this session" if self._hangs_in_a_row >= MAX_HANGS else "")
        self._backoff_s = min(60.0, self._backoff_s * 2)
        self.forget(key)

    async def analyze(self, key: str, language: str, text: str, offset: int, check_hole: bool) -> SyntaxFacts | None:
        if not self.usable(language, text):
            return None
        return await self._run(key, analyze, self.cache, key, language, text, offset, self.deadline_s, check_hole)

    async def tree(self, key: str, language: str, text: str):
        """The document's tree (incremental, cached), or None: no grammar, too large, or past the deadline."""
        if not self.usable(language, text):
            return None
        return await self._run(key, self.cache.parse, key, language, text.encode("utf-8", "surrogatepass"), self.deadline_s)

    async def trim(self, facts: SyntaxFacts, suggestion: str) -> str:
        import asyncio

        future = asyncio.wrap_future(self._worker.submit(syntax_trim, facts, suggestion, self.deadline_s))
        try:
            return await asyncio.wait_for(future, self.deadline_s + HANG_GRACE_S)
        except asyncio.TimeoutError:
            self._hung("a suggestion check")
            return suggestion  # no verdict: the model's text as post-processing left it

    def forget(self, key: str) -> None:
        for suffix in ("", "#window", "#head"):
            self._worker.submit(self.cache.forget, key + suffix)  # the cache belongs to the parse thread
