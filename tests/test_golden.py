"""Golden accept-the-completion tests (see tests/golden_runner.py for the format)."""

from __future__ import annotations

import pytest

from golden_runner import all_cases, load, run_case
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
