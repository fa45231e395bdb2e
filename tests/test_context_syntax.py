"""Tree-sitter context: incremental trees, deadlines, decisions, syntax trimming, prompt assembly."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from lsp_server import prompts
from lsp_server.config import CompletionSettings
from lsp_server.context import Snapshot, build_context, indent_unit
from lsp_server.context.crossfile import CrossFileContext, RecentEdits, top_level_definitions
from lsp_server.context import syntax
from lsp_server.context.syntax import ParseTimeout, TreeCache, analyze, parse_bytes, syntax_trim
from lsp_server.engine.backends import fake_tokenize


def facts_for(language: str, marked: str, check_hole: bool = True):
    offset = marked.index("|")
    text = marked.replace("|", "", 1)
    return analyze(TreeCache(), "k", language, text, offset, 0.5, check_hole), text, offset


@pytest.mark.parametrize("language", ["python", "javascript", "go", "rust", "c", "cpp", "java", "typescript"])
def test_incremental_parse_equals_a_fresh_parse(language):
    rng = random.Random(3)
    samples = {
        "python": "def f(x):\n    return x + 1\n",
        "javascript": "function f(x) {\n  return x + 1;\n}\n",
        "typescript": "function f(x: number): number {\n  return x + 1;\n}\n",
        "go": "package m\n\nfunc f(x int) int {\n\treturn x + 1\n}\n",
        "rust": "fn f(x: i32) -> i32 {\n    x + 1\n}\n",
        "c": "int f(int x) {\n  return x + 1;\n}\n",
        "cpp": "int f(int x) {\n  return x + 1;\n}\n",
        "java": "class A {\n  int f(int x) { return x + 1; }\n}\n",
    }
    text = samples[language]
    cache = TreeCache()
    pieces = ["x", " ", "(", ")", "{", "}", "\n", "é", "😀", ";", "return "]
    for _ in range(60):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        text = text[:i] + rng.choice(pieces) + text[j:]
        data = text.encode()
        incremental = cache.parse("doc", language, data, None)
        fresh = parse_bytes(language, data)
        assert str(incremental.root_node) == str(fresh.root_node)


def test_parse_deadline_raises_instead_of_hanging():
    data = b"x = [" + b"1, " * 400_000 + b"]\n"
    t0 = time.monotonic()
    with pytest.raises(ParseTimeout):
        parse_bytes("python", data, deadline_s=0.01)
    assert time.monotonic() - t0 < 1.0


def test_facts_comment_headers_and_holes():
    facts, _, _ = facts_for("python", "class A:\n    def f(self):\n        # wor|d\n        pass\n")
    assert facts.in_comment and facts.headers == ["class A:", "    def f(self):"]
    assert facts_for("python", "x = foo(|, 2)\n")[0].hole_at_cursor
    assert not facts_for("python", "x = foo(|b, 2)\n")[0].hole_at_cursor
    assert facts_for("go", "package m\nfunc f() { x := g(|, 2) }\n")[0].hole_at_cursor


def test_python_cursor_below_a_function_is_outside_it():
    assert facts_for("python", "def f():\n    pass\n\n|")[0].headers == []
    assert facts_for("python", "def f():\n    pass\n    |")[0].headers == ["def f():"]


@pytest.mark.parametrize(
    "language, marked, suggestion, kept",
    [
        ("python", "def f(x):\n    return |\n", "x + (1", "x"),
        ("python", "def f(x):\n    return |\n", "x + 1\n    y = (", "x + 1"),
        ("javascript", "function f(a) {\n  |\n}\n", "return a + 1;\n  if (", "return a + 1;"),
        ("c", "int f(int a) {\n  return |\n}\n", "a * 2; }", "a * 2;"),
        ("python", "x = |\n", ")))", ""),
    ],
)
def test_syntax_trim_keeps_the_longest_prefix_that_parses(language, marked, suggestion, kept):
    facts, _, _ = facts_for(language, marked, check_hole=False)
    assert syntax_trim(facts, suggestion, 0.5) == kept


def test_decisions_use_the_tree():
    settings = CompletionSettings()

    def ctx(language_id, uri, marked):
        facts, text, offset = facts_for({"python": "python", "go": "go"}[language_id], marked)
        return build_context(Snapshot(uri, 1, text, offset, language_id), settings, facts)

    assert ctx("python", "file:///a.py", "x = foo(|, 2)\n").single_line
    assert not ctx("python", "file:///a.py", "x = foo(|, 2)\n").skip_reason
    assert ctx("python", "file:///a.py", "x = foo(|b, 2)\n").skip_reason == "cursor inside a word"
    assert ctx("python", "file:///a.py", "# the valu| of\nx = 1\n").skip_reason == "typing a word in a comment"
    header_ctx = ctx("python", "file:///a.py", "def f(x):\n" + "    y = 1\n" * 5 + "    |")
    assert header_ctx.header == "def f(x):\n" and header_ctx.header_at == 0


def test_indent_unit():
    assert indent_unit("func f() {\n\tx := 1\n\tif x {\n\t\ty()\n\t}\n}\n") == "\t"
    assert indent_unit("def f():\n  if x:\n    y()\n") == "  "
    assert indent_unit("x = 1\n") == "    "
    gnu = "int f(void)\n{\n  if (x)\n    {\n      y();\n\tz();\n\t  w();\n    }\n}\n"
    assert indent_unit(gnu) == ""


def test_pinned_header_returns_when_the_window_drops_it():
    body = "".join(f"    v{i} = {i}\n" for i in range(200))
    text = "def compute(alpha, beta):\n" + body + "    return "
    seg = prompts.Segment(text, budget_tokens=60, keep="end", pinned="def compute(alpha, beta):\n", pinned_at=0)
    tokens = prompts.build_prompt_tokens([seg], tokenize_text=fake_tokenize, tokenize_special=lambda s: [], bos=[]).tokens
    header = fake_tokenize("def compute(alpha, beta):\n")
    assert tokens[: len(header)] == header and len(tokens) <= 60
    whole = prompts.Segment("def compute(alpha, beta):\n    return ", budget_tokens=60, keep="end", pinned="def compute(alpha, beta):\n", pinned_at=0)
    tokens = prompts.build_prompt_tokens([whole], tokenize_text=fake_tokenize, tokenize_special=lambda s: [], bos=[]).tokens
    assert tokens == fake_tokenize(whole.text)  # the window has it already: not twice


def test_assemble_repo_layout_and_comment_layout():
    templates = prompts.load_templates()
    parts = prompts.PromptParts(
        prefix=prompts.PromptValue("x = helper("), suffix=prompts.PromptValue(")\n"), path="pkg/main.py",
        repo_name="demo", snippets=[("pkg/util.py", "def helper(a):\n    return a")], snippet_budget_tokens=64,
    )
    qwen = prompts.assemble(templates["qwen2.5-coder"], parts)
    special = "".join(s.text for s in qwen if s.special)
    assert special.startswith("<|repo_name|>") and special.count("<|file_sep|>") == 2
    texts = [s.text for s in qwen if not s.special]
    assert texts[:3] == ["demo", "pkg/util.py", "def helper(a):\n    return a"] and "pkg/main.py" in texts
    deepseek = prompts.assemble(templates["deepseek-coder"], parts)
    plain = [s.text for s in deepseek if not s.special]
    assert plain[0].startswith("# pkg/util.py\n# def helper(a):") and plain[1] == "x = helper("


def test_imported_definitions_from_workspace_and_open_documents(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "util.py").write_text("import os\n\ndef helper(a, b=2):\n    '''Add.'''\n    return a + b\n\nclass Box:\n    size = 3\n")
    (tmp_path / "pkg" / ".env").write_text("SECRET=1\n")
    main = tmp_path / "pkg" / "main.py"
    text = "from .util import helper, Box\nfrom pkg.util import helper as h\n\nx = helper(\n"
    cross = CrossFileContext()
    cross.roots = [tmp_path.resolve()]
    facts, _, _ = facts_for("python", text + "|")
    snippets = cross.import_snippets(main.as_uri(), "python", facts.tree, facts.data, {})
    assert snippets and snippets[0].path == "pkg/util.py"
    assert "def helper(a, b=2):" in snippets[0].text and "class Box:" in snippets[0].text
    # An open document wins over the file on disk.
    open_text = {(tmp_path / "pkg" / "util.py").as_uri(): "def helper(q):\n    return q\n"}
    snippets = cross.import_snippets(main.as_uri(), "python", facts.tree, facts.data, open_text)
    assert snippets[0].text.startswith("def helper(q):")
    # Nothing outside the workspace is read.
    cross.roots = [tmp_path / "elsewhere"]
    assert cross.import_snippets(main.as_uri(), "python", facts.tree, facts.data, {}) == []


def test_js_relative_imports(tmp_path: Path):
    (tmp_path / "lib.ts").write_text("export function area(r: number): number {\n  return Math.PI * r * r;\n}\n")
    cross = CrossFileContext()
    cross.roots = [tmp_path.resolve()]
    facts, _, _ = facts_for("typescript", "import { area } from './lib';\nconst a = |\n", check_hole=False)
    snippets = cross.import_snippets((tmp_path / "main.ts").as_uri(), "typescript", facts.tree, facts.data, {})
    assert snippets and "function area(r: number)" in snippets[0].text


def test_recent_edits_ring_is_small_and_deduplicated():
    ring = RecentEdits(capacity=2, radius_lines=2)
    texts = {"file:///a.py": "\n".join(f"a{i}" for i in range(40)), "file:///b.py": "b0\nb1\n"}
    ring.record("file:///a.py", 10)
    ring.record("file:///a.py", 11)  # same region
    ring.record("file:///b.py", 0)
    ring.record("file:///a.py", 30)
    snippets = ring.snippets(texts, "file:///c.py", lambda uri: uri.rsplit("/", 1)[1])
    assert [s.path for s in snippets] == ["a.py", "b.py"] and "a30" in snippets[0].text
    assert ring.snippets(texts, "file:///a.py", str)[0].text.startswith("b0")


def test_top_level_definitions_are_short():
    text = "def long():\n" + "    x = 1\n" * 50
    assert top_level_definitions("python", text)["long"].count("\n") <= 13


def test_commonjs_requires(tmp_path: Path):
    (tmp_path / "util.js").write_text("function slug(s) {\n  return s.toLowerCase()\n}\nconst VERSION = '1'\nmodule.exports = { slug, VERSION }\n")
    cross = CrossFileContext()
    cross.roots = [tmp_path.resolve()]
    facts, _, _ = facts_for("javascript", "const { slug } = require('./util.js')\nconst s = |\n", check_hole=False)
    snippets = cross.import_snippets((tmp_path / "main.js").as_uri(), "javascript", facts.tree, facts.data, {})
    assert [s.text.split("\n")[0] for s in snippets] == ["function slug(s) {"]
    facts, _, _ = facts_for("javascript", "const util = require('./util')\nutil.|\n", check_hole=False)
    snippets = cross.import_snippets((tmp_path / "main.js").as_uri(), "javascript", facts.tree, facts.data, {})
    assert "function slug(s)" in snippets[0].text and "VERSION" in snippets[0].text


def test_total_budget_gives_the_prefix_what_other_files_leave():
    templates = prompts.load_templates()
    prefix_text = "".join(f"v{i} = {i}\n" for i in range(300))
    parts = prompts.PromptParts(
        prefix=prompts.PromptValue(prefix_text, 200, "end"), suffix=prompts.PromptValue("\nend = 1\n", 20, "start"),
        snippets=[("util.py", "def helper(a):\n    return a\n")], snippet_budget_tokens=40,
    )
    segments = prompts.assemble(templates["qwen2.5-coder"], parts)
    with_files = prompts.build_prompt_tokens(segments, tokenize_text=fake_tokenize, tokenize_special=lambda s: [1], bos=[], max_prompt_tokens=120)
    assert len(with_files.tokens) <= 120
    snippet_tokens = len(fake_tokenize("def helper(a):\n    return a\n"))
    assert snippet_tokens in with_files.segment_token_counts  # the other file is whole
    alone = prompts.build_prompt_tokens(prompts.assemble(templates["qwen2.5-coder"], prompts.PromptParts(parts.prefix, parts.suffix)),
                                        tokenize_text=fake_tokenize, tokenize_special=lambda s: [1], bos=[], max_prompt_tokens=120)
    assert len(alone.tokens) <= 120 and max(alone.segment_token_counts) > max(c for c in with_files.segment_token_counts)


def _prefix_token_runs(anchor_lines: int, typed: str) -> tuple[int, list[int]]:
    """Type `typed` at the end of a long file, one character per request; returns how many times the
    prompt's first prefix tokens changed, and the prefix token counts."""
    settings = CompletionSettings(max_prefix_tokens=400, max_prompt_tokens=800, prefix_anchor_lines=anchor_lines)
    body = "".join(f"    total_{i} = compute(values[{i}], scale={i % 7})\n" for i in range(200))
    head = "def run(values):\n" + body + "    "
    changes, counts, previous = 0, [], None
    for n in range(len(typed) + 1):
        text = head + typed[:n]
        ctx = build_context(Snapshot("file:///r.py", n, text, len(text), "python"), settings)
        seg = prompts.Segment(ctx.prefix, budget_tokens=settings.max_prefix_tokens, keep="end",
                              first_line=ctx.prefix_first_line, anchor_lines=anchor_lines)
        tokens = prompts.build_prompt_tokens([seg], tokenize_text=fake_tokenize, tokenize_special=lambda s: [], bos=[]).tokens
        counts.append(len(tokens))
        if previous is not None and tokens[:20] != previous:
            changes += 1
        previous = tokens[:20]
    return changes, counts


def test_anchored_prefix_window_stays_put_while_typing():
    typed = "".join(f"result_{i} = finish(total_{i}, total_2) + adjust(values, {i})\n    " for i in range(8))
    anchored, counts = _prefix_token_runs(8, typed)
    unanchored, _ = _prefix_token_runs(0, typed)
    # cut right at the budget, the window's start moves with every line's worth of typed tokens; anchored
    # at multiples of 8 lines, about once per 8 lines' worth
    assert unanchored >= 8 and anchored * 4 <= unanchored
    assert min(counts) >= 400 - 40 and max(counts) <= 400 + 7 * 40  # the budget less part of a line, at most 7 lines more


def test_window_start_is_a_whole_line_at_an_anchor():
    from lsp_server.context import _window_start

    text = "".join(f"line {i}\n" for i in range(100))
    cursor_line_start = text.index("line 90")
    start, number = _window_start(text, text.index("line 41") + 3, cursor_line_start, 8)
    assert number == 40 and text[start:].startswith("line 40\n")  # back to the anchor: more context, not less
    start, number = _window_start(text, text.index("line 41"), cursor_line_start, 0)
    assert number == 41 and text[start:].startswith("line 41\n")
    assert _window_start(text, 0, cursor_line_start, 8) == (0, 0)
    start, number = _window_start(text, text.index("line 89") + 2, cursor_line_start, 8)
    assert number == 88 and text[start:].startswith("line 88\n")
    start, number = _window_start(text, text.index("line 90") + 2, cursor_line_start, 0)
    assert start == cursor_line_start  # never past the cursor's line


def test_big_documents_are_analyzed_in_a_window_with_the_same_facts(monkeypatch):
    from lsp_server.context import syntax
    from lsp_server.context.crossfile import _python_imports

    body = "".join(f"def f{i}(value):\n    # note {i}\n    return value * {i}\n\n\n" for i in range(1500))
    text = "from helpers import scale, shift\n\n\nclass Big:\n    def method(self, x):\n        if x:\n            y = f(\n" + body
    cursors = [text.index("y = f(") + 6, text.index("# note 700") + 4, text.index("return value * 1400") + 7]
    windowed = [syntax.analyze(syntax.TreeCache(), "file:///big.py", "python", text, c, 1.0, True) for c in cursors]
    monkeypatch.setattr(syntax, "WINDOW_MIN_CHARS", 10**9)
    whole = [syntax.analyze(syntax.TreeCache(), "file:///big.py", "python", text, c, 1.0, True) for c in cursors]
    for w, f in zip(windowed, whole):
        assert len(w.data) < len(f.data) // 10  # a window, not the document
        assert (w.in_comment, w.in_string, w.hole_at_cursor, w.headers, w.header_offset) == \
            (f.in_comment, f.in_string, f.hole_at_cursor, f.headers, f.header_offset)
        assert _python_imports(w.head_tree.root_node, w.head_data) == [("helpers", ["scale", "shift"])]
    assert windowed[0].headers[0].startswith("class Big") and windowed[1].in_comment


def test_analysis_window_bounds():
    from lsp_server.context.syntax import WINDOW_MAX_LINES, analysis_window

    short = "def f():\n    return 1\n"
    assert analysis_window(short, 5) == (0, len(short))
    text = "int main(void) {\n" + "    x++;\n" * 5000 + "}\nint other(void) {\n    return 0;\n}\n"
    cursor = text.index("x++", len(text) // 2)
    start, end = analysis_window(text, cursor)
    assert text[start:cursor].count("\n") <= WINDOW_MAX_LINES and text[cursor:end].count("\n") <= WINDOW_MAX_LINES + 1
    last = text.rindex("x++")
    start, end = analysis_window(text, last)
    assert text[start:end].endswith("}\n") and text[end:].startswith("int other")  # a closing brace stays inside


def test_syntax_check_stands_aside_where_the_grammar_cannot_parse_the_scope(monkeypatch):
    # Macros the grammar cannot expand (as in libstdc++ headers) make the scope an ERROR soup (4 here);
    # the correct `pointer` adds one more there, and a strict check would throw it away.
    macro_heavy = (
        "namespace box BOX_VISIBILITY(default)\n{\nBOX_BEGIN_NAMESPACE\n  struct Box\n  {\n"
        "    [[gnu::const, nodiscard]]\n    BOX_CONSTEXPR |\n    data() noexcept\n    { return storage_(items_); }\n\n"
        "    [[nodiscard]]\n    BOX_CONSTEXPR const_pointer\n    data() const noexcept\n    { return storage_(items_); }\n"
        "  };\nBOX_END_NAMESPACE\n}\n"
    )
    facts = facts_for("cpp", macro_heavy)[0]
    assert syntax_trim(facts, "pointer", 0.5) == "pointer"
    monkeypatch.setattr(syntax, "UNPARSED_SCOPE_ERRORS", 10**6)
    assert syntax_trim(facts, "pointer", 0.5) == ""  # what the strict check did
    monkeypatch.undo()
    # Where the grammar parses the scope, junk is still refused.
    assert syntax_trim(facts_for("cpp", "struct A {\n  int |\n  int y;\n};\n")[0], "x) {{", 0.5) != "x) {{"
