"""Templates, family detection, token budgets, the generation text rules and post-processing."""

import pytest
from pathlib import Path

from lsp_server import prompts
from lsp_server.config import CompletionSettings, Settings, field_docs, merge
from lsp_server.context import Snapshot, build_context
from lsp_server.engine.backends import fake_tokenize
from lsp_server.engine.generation import TextAccumulator
from lsp_server.engine.protocol import GenerationRequest
from lsp_server.postprocess import clean


def test_all_six_families_have_templates_with_both_placeholders():
    templates = prompts.load_templates()
    assert set(templates) >= {"qwen2.5-coder", "deepseek-coder", "starcoder2", "codellama", "codestral", "codegemma"}
    for t in templates.values():
        assert "${prefix}" in t.template and "${suffix}" in t.template, t.family
        assert t.stop and t.detect_tokens, t.family


def test_codestral_puts_the_suffix_first():
    segments = prompts.render(prompts.load_templates()["codestral"], {"prefix": prompts.PromptValue("P"), "suffix": prompts.PromptValue("S")})
    assert [(s.text, s.special) for s in segments] == [("[SUFFIX]", True), ("S", False), ("[PREFIX]", True), ("P", False)]


def test_code_is_never_a_special_segment():
    code = "x = '<|fim_middle|>' ${suffix} $$"
    segments = prompts.render(prompts.load_templates()["qwen2.5-coder"], {"prefix": prompts.PromptValue(code), "suffix": prompts.PromptValue("")})
    assert [s.text for s in segments if not s.special] == [code, ""]
    assert all("x = " not in s.text for s in segments if s.special)


@pytest.mark.parametrize(
    "tokens, architecture, family",
    [
        (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"], "qwen2", "qwen2.5-coder"),
        (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"], "gemma", "codegemma"),
        (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], "starcoder2", "starcoder2"),
        (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], "llama", "deepseek-coder"),
        (["[SUFFIX]", "[PREFIX]", "[MIDDLE]"], "llama", "codestral"),
        (["▁<PRE>", "▁<SUF>", "▁<MID>"], "llama", "codellama"),
        (["<|im_start|>"], "qwen2", None),
    ],
)
def test_family_detected_from_vocabulary(tokens, architecture, family):
    assert prompts.detect_family(tokens, architecture) == family


def test_budget_keeps_whole_lines_nearest_the_cursor():
    text = "".join(f"line_{i} = {i}\n" for i in range(100)) + "tail = "
    _, kept = prompts.fit_to_budget(text, 40, "end", fake_tokenize)
    assert len(kept) <= 40
    full = fake_tokenize(text)
    assert full[-len(kept):] == kept  # a suffix of the whole: nothing in the middle dropped
    assert len(kept) >= 40 - 8  # at most one line's worth of tokens unused


def test_budget_keeps_the_start_of_the_suffix():
    text = "".join(f"line_{i} = {i}\n" for i in range(100))
    _, kept = prompts.fit_to_budget(text, 24, "start", fake_tokenize)
    assert fake_tokenize(text)[: len(kept)] == kept and 16 <= len(kept) <= 24


def test_over_long_single_line_is_cut_by_tokens():
    text = "x = " + " + ".join(["a"] * 200)
    assert len(prompts.fit_to_budget(text, 10, "end", fake_tokenize)[1]) == 10


def _req(**kw) -> GenerationRequest:
    return GenerationRequest(segments=[], **kw)


def test_single_line_stops_at_the_first_line_end_after_content():
    acc = TextAccumulator(_req(single_line=True))
    assert not acc.feed("\n    ")
    assert not acc.feed("return x")
    assert acc.feed("\n    y")
    assert acc.text == "\n    return x"


def test_stop_string_cuts_before_it():
    acc = TextAccumulator(_req(single_line=False, stop=["<|file_sep|>"]))
    assert not acc.feed("a = 1\n<|file_")  # a stop string split across pieces
    assert acc.feed("sep|>junk")
    assert acc.text == "a = 1\n" and acc.finish == "stop"


def test_block_ends_when_indentation_falls_below_the_cursor():
    acc = TextAccumulator(_req(single_line=False, min_indent=4, max_lines=20))
    for piece in ["if x:\n", "        return 1\n", "    return 2\n", "\n", "def other():"]:
        if acc.feed(piece):
            break
    assert acc.finish == "indent"
    assert acc.text == "if x:\n        return 1\n    return 2\n"


def test_block_cut_by_length_keeps_complete_lines():
    acc = TextAccumulator(_req(single_line=False, max_lines=20))
    acc.feed("a = 1\nb = 2\nc = fun")
    assert acc.end("length") == "a = 1\nb = 2"


def _ctx(text: str, marker: str = "|", language_id: str = "python"):
    offset = text.index(marker)
    text = text.replace(marker, "", 1)
    return build_context(Snapshot("file:///t.py", 1, text, offset, language_id), CompletionSettings())


def test_context_rules_single_and_multi_line():
    assert not _ctx("def f(x):\n    |\n").single_line  # empty line in a block
    assert not _ctx("def f(x):|\n").single_line  # after a block opener
    assert _ctx("x = foo(|)\n").single_line  # mid-expression
    assert _ctx("x = compute(a, | b)\n").skip_reason == "code right of the cursor"  # no tree says a hole is there
    assert _ctx("val|ue = 1\n").skip_reason == "cursor inside a word"
    assert not _ctx("function f() {|\n}", language_id="javascript").single_line


def test_context_indent_and_eol():
    ctx = _ctx("class A:\r\n    def f(self):\r\n        |\r\n")
    assert ctx.indent == 8 and ctx.eol == "\r\n"


def test_clean_trims_the_closing_text_already_after_the_cursor():
    assert clean("a, b)", _ctx("foo(|)\n")) == "a, b"
    assert clean('name"]', _ctx('d["|"]\n')) == "name"


def test_clean_drops_a_repeat_of_the_following_lines_and_matches_crlf():
    ctx = _ctx("def f():\r\n    |\r\n    return y\r\n")
    assert clean("y = 1\n    return y\n", ctx) == "y = 1"
    ctx = _ctx("def f():\r\n    |\r\n")
    assert clean("a = 1\n    b = 2", ctx) == "a = 1\r\n    b = 2"


def test_clean_removes_special_tokens_and_bidi_controls():
    ctx = _ctx("x = |\n")
    assert clean("1 +\u202e 2<|endoftext|>junk", ctx) == "1 + 2"
    assert clean("   ", ctx) == ""


def test_settings_merge_camel_case_and_keep_defaults_on_bad_values():
    settings = Settings()
    warnings = merge(settings, {"offpilot": {"completion": {"maxPrefixTokens": 256, "temperature": "hot", "maxLines": -3}, "nope": {}}}, source="test")
    assert settings.completion.max_prefix_tokens == 256
    assert settings.completion.temperature == 0.0 and settings.completion.max_lines == 12
    assert len(warnings) == 3
    assert merge(settings, {"completion": {"debounceMs": -1}}, source="test") == []  # its own default: automatic


def test_every_setting_has_a_docstring():
    import dataclasses

    from lsp_server import config

    for cls in (config.ModelSettings, config.CompletionSettings, config.WorkerSettings, config.Settings):
        docs = field_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} == set(docs), cls.__name__


def test_readme_settings_table_is_current():
    from lsp_server.config import settings_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, "README settings table is stale: run scripts/readme_settings.py"


def test_a_forced_middle_follows_the_middle_marker_or_ends_the_prefix_in_suffix_first_layouts():
    templates = prompts.load_templates()
    parts = prompts.PromptParts(prefix=prompts.PromptValue("def f(x):\n"), suffix=prompts.PromptValue("\nprint(f(2))\n", keep="start"),
                                middle="    retu")
    psm = prompts.assemble(templates["qwen2.5-coder"], parts)
    assert [s.text for s in psm][-2:] == ["<|fim_middle|>", "    retu"]
    spm = prompts.assemble(templates["codestral"], parts)
    assert spm[-1].text == "def f(x):\n    retu" and not spm[-1].special
    # The budget fill still goes to the prefix, not to the middle.
    tok = lambda s: list(s.encode())  # noqa: E731
    built = prompts.build_prompt_tokens(psm, tokenize_text=tok, tokenize_special=lambda s: [0], bos=[], max_prompt_tokens=20)
    assert built.tokens[-8:] == tok("    retu")
