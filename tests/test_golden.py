"""Golden accept-the-completion tests (see tests/golden_runner.py for the format)."""

from __future__ import annotations

import pytest

from golden_runner import all_cases, load, run_case, run_case_lsp
from lsp_server.context.syntax import count_errors, parse_bytes
from lsp_server.languages import detect

CASES = all_cases()


def _errors(file_name: str, text: str) -> int | None:
    info = detect("", f"file:///{file_name}")
    if info is None:
        return None
    tree = parse_bytes(info.name, text.encode("utf-8"))
    return count_errors(tree.root_node, 0, len(text.encode("utf-8")) + 1)


def test_there_are_enough_cases_across_the_languages():
    languages = {p.parent.name for p in CASES}
    assert len(CASES) >= 60, len(CASES)
    assert languages >= {"python", "javascript", "typescript", "go", "rust", "c", "cpp", "java"}, languages


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_golden(path):
    case = load(path)
    accepted = await run_case(case)
    if case.expected is None:
        assert accepted is None, f"expected no suggestion, got:\n{accepted}"
        return
    assert accepted == case.expected
    before, after = _errors(case.file_name, case.document), _errors(case.file_name, accepted)
    if before is not None:
        assert after <= before, f"accepting added parse errors ({before} -> {after})"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_golden_through_the_handler_in_each_encoding(path, encoding):
    """D6: the same cases through the LSP handler, the cursor and the item's range in each position encoding
    (CRLF cases included): accepting the item gives exactly the golden file."""
    case = load(path)
    accepted = await run_case_lsp(case, encoding)
    assert accepted == case.expected
