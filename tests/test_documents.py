import random

import pytest

from lsp_server.documents import UTF8, UTF16, UTF32, DocumentStore, InvalidEdit, TextChange, line_starts


def _store(text: str, version: int = 1) -> DocumentStore:
    store = DocumentStore()
    store.open("file:///a.py", "python", version, text)
    return store


def _edit(sl, sc, el, ec, text, length=None) -> TextChange:
    return TextChange(text, ((sl, sc), (el, ec)), length)


def test_lines_split_only_on_lsp_line_ends():
    text = "a\fb\u2028c\r\nd\re\nf\x0bg\x85h"
    assert line_starts(text) == [0, 7, 9, 11]


@pytest.mark.parametrize(
    "encoding, character, expected_index",
    [(UTF16, 3, 2), (UTF8, 5, 2), (UTF32, 2, 2)],
)
def test_position_after_an_emoji_in_each_encoding(encoding, character, expected_index):
    store = _store("a😀b")
    doc = store.get("file:///a.py")
    assert doc.offset_at(0, character, encoding, strict=True) == expected_index


@pytest.mark.parametrize("encoding, character", [(UTF16, 2), (UTF8, 3)])
def test_position_inside_a_multi_unit_character_is_rejected(encoding, character):
    doc = _store("a😀b").get("file:///a.py")
    with pytest.raises(InvalidEdit):
        doc.offset_at(0, character, encoding, strict=True)


def test_incremental_edits_in_utf16_with_crlf_and_cjk():
    store = _store("名前 = 1\r\nprint(名前)\r\n")
    store.change("file:///a.py", 2, [_edit(1, 6, 1, 8, "値")], UTF16)
    assert store.get("file:///a.py").text == "名前 = 1\r\nprint(値)\r\n"
    store.change("file:///a.py", 3, [_edit(2, 0, 2, 0, "x = 2")], UTF16)  # the (lineCount, 0) position
    assert store.get("file:///a.py").text.endswith("print(値)\r\nx = 2")


def test_form_feed_and_u2028_do_not_shift_lines():
    store = _store("a\f = 1\nb\u2028 = 2\nc = 3\n")
    store.change("file:///a.py", 2, [_edit(2, 0, 2, 1, "z")], UTF16)
    assert store.get("file:///a.py").text == "a\f = 1\nb\u2028 = 2\nz = 3\n"


def test_reversed_range_is_rejected_whole_and_marks_desync():
    store = _store("abcdef")
    with pytest.raises(InvalidEdit):
        store.change("file:///a.py", 2, [_edit(0, 0, 0, 0, "ok"), _edit(0, 4, 0, 1, "X")], UTF16)
    doc = store.get("file:///a.py")
    assert doc.text == "abcdef" and doc.version == 1 and doc.desynced
    store.change("file:///a.py", 3, [TextChange("fresh")], UTF16)
    assert doc.text == "fresh" and not doc.desynced


@pytest.mark.parametrize(
    "change",
    [
        _edit(5, 0, 5, 0, "x"),  # line past the end
        _edit(0, 9, 0, 9, "x"),  # character past the end of the line
        _edit(0, 0, 0, 2, "x", length=7),  # rangeLength that does not match
    ],
)
def test_invalid_positions_are_rejected(change):
    store = _store("abc\n")
    with pytest.raises(InvalidEdit):
        store.change("file:///a.py", 2, [change], UTF16)
    assert store.get("file:///a.py").text == "abc\n"


def test_version_must_increase():
    store = _store("abc", version=5)
    with pytest.raises(InvalidEdit):
        store.change("file:///a.py", 5, [_edit(0, 0, 0, 0, "x")], UTF16)
    assert store.get("file:///a.py").text == "abc"


def test_change_to_unknown_document_is_rejected():
    with pytest.raises(InvalidEdit):
        DocumentStore().change("file:///nope.py", 1, [TextChange("x")], UTF16)


def test_read_positions_are_clamped():
    doc = _store("ab\ncd").get("file:///a.py")
    assert doc.offset_at(0, 99, UTF16) == 2
    assert doc.offset_at(99, 0, UTF16) == 5
    assert doc.offset_at(-1, 0, UTF16) == 0


def _reference_apply(text: str, sl: int, sc: int, el: int, ec: int, new: str) -> str:
    """Independent reference: split on LSP line ends, count UTF-16 units by encoding."""
    import re

    pieces = re.split(r"(\r\n|\r|\n)", text)
    lines = pieces[0::2]
    ends = pieces[1::2] + [""]

    def off(line: int, col: int) -> int:
        base = sum(len(lines[i]) + len(ends[i]) for i in range(line))
        units = lines[line].encode("utf-16-le")[: col * 2].decode("utf-16-le")
        return base + len(units)

    return text[: off(sl, sc)] + new + text[off(el, ec) :]


def test_random_edit_sessions_match_a_reference():
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "\r\n", "\r", "😀", "名", "\f", "\u2028", "é"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        store = _store(text)
        doc = store.get("file:///a.py")
        for version in range(2, 8):
            n_lines = len(doc.starts)
            sl = rng.randrange(n_lines)
            el = rng.randrange(sl, n_lines)
            line_units = lambda ln: len(doc.text[doc.starts[ln] : doc.line_content_end(ln)].encode("utf-16-le")) // 2  # noqa: E731
            sc = rng.randint(0, line_units(sl))
            ec = rng.randint(sc if el == sl else 0, line_units(el))
            new = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
            try:
                expected = _reference_apply(doc.text, sl, sc, el, ec, new)
            except UnicodeDecodeError:
                expected = None  # the reference cannot cut inside a surrogate pair either
            try:
                store.change("file:///a.py", version, [_edit(sl, sc, el, ec, new)], UTF16)
            except InvalidEdit:
                assert expected is None  # only a cut inside a surrogate pair is invalid here
                doc.desynced = False
                continue
            assert doc.text == expected


def test_line_starts_kept_through_edits_match_a_recount():
    import random

    from lsp_server.documents import UTF16, DocumentStore, InvalidEdit, TextChange, line_starts

    rng = random.Random(7)
    pieces = ["a", "bc", "\n", "\r\n", "\r", " ", "é", "😀", "\u2028", "x\ny"]
    store = DocumentStore()
    doc = store.open("file:///s.txt", "plaintext", 1, "start\r\nmiddle\rend\n")
    kept = 0
    for version in range(2, 400):
        starts = doc.starts
        lines = len(starts)
        sl = rng.randrange(lines)
        el = min(lines - 1, sl + rng.choice([0, 0, 1, 2]))
        def col(line):
            content = doc.text[starts[line]:doc.line_content_end(line)]
            return len(content.encode("utf-16-le")) // 2
        sc = rng.randint(0, col(sl))
        ec = rng.randint(sc if el == sl else 0, col(el))
        new = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))
        try:
            doc = store.change(doc.uri, version, [TextChange(new, ((sl, sc), (el, ec)))], UTF16)
        except InvalidEdit:  # a position inside a surrogate pair: rejected whole, as it must be
            doc = store.open(doc.uri, "plaintext", version, doc.text)
            continue
        kept += doc._starts is not None
        assert doc.starts == line_starts(doc.text), (version, repr(doc.text))
    assert kept > 200  # most edits update the line starts instead of recounting them
