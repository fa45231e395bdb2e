#!/usr/bin/env python3
"""Quality evaluation: holes cut from real source code, completed by the LSP and by a naive FIM baseline.

Holes come from code we did not write that is already on this machine (installed Python packages, npm's
own JavaScript, the JDK's src.zip, libstdc++'s headers, C examples under /usr/share/doc, the Rust standard
library from rustup's docs, ...; see --list-sources) or from --source-dir. Per language, half the holes
are of each kind:

* single: the cursor after a separator inside a line of code, the rest of the line removed; expected:
  the rest of that line;
* multi: the cursor at the start of a function's or block's body (after the indentation of its first
  statement), the 2-6 whole lines of the body's first statements removed; expected: those lines (from the
  cursor, without the final line end). Bodies are found with tree-sitter.

Each hole is completed twice, one after the other, the order alternating from hole to hole:

* LSP: `python -m lsp_server serve` as an editor drives it (didOpen, textDocument/inlineCompletion with
  triggerKind 1, didClose); the prediction is the first item's insertText ("" when there is none); timed
  from sending the request to reading its reply. The response cache and the prefetch are off (one request
  per document: the cache could only answer from an earlier run, a prefetch could only slow the other path);
* naive: what a plain FIM integration does, in this process with llama-cpp-python, the same model, n_ctx
  and threads: the model family's FIM template (the server's template files and family detection) around a
  fixed line window (the previous 40 lines and the cursor line up to the cursor; the rest of the cursor
  line and the next 10 lines), the server's hardware plan (context length, threads), temperature 0, max_tokens 48 (single) / 128 (multi), stopping at the
  model's end of generation or the template's stop strings, and for single-line holes at the first line
  end; no other post-processing. Only `create_completion` is timed.

Metrics per hole and path: exact match (single: stripped texts equal; multi: the stripped texts equal line
by line, trailing whitespace ignored), edit similarity (1 - Levenshtein / longer length, on texts with
whitespace normalised: runs of blanks as one space, lines stripped, blank lines dropped), latency, and
whether the prediction is non-empty. The report is a table per language and kind with overall rows, then
verdicts for the acceptance targets (single-line EM >= naive + 0.05; ES >= naive + 0.03 overall; multi-line
EM >= naive; latency p50 <= 1.10 x naive). It is a measurement: the exit code is 0 even when a target is
missed, unless something crashed.

Usage:
    .venv/bin/python scripts/eval_fim.py [--holes 30] [--seed 0] [--languages python,javascript,...]
        [--model NAME_OR_PATH] [--source-dir DIR ...] [--no-default-sources] [--json-out FILE]
        [--prefix-lines 40] [--suffix-lines 10] [--timeout 120] [--list-sources]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsp_server.hardware import plan_for_file  # noqa: E402

from holes import (  # noqa: E402  (scripts/holes.py: sources, holes, the LSP client, report helpers)
    DEFAULT_SOURCES,
    MAX_LINE_CHARS,
    MIN_CONTENT_CHARS,
    REPO,
    Cut,
    Hole,
    LlamaModel,
    LspPath,
    PathResult,
    eligible_lines,
    fmt_ms,
    language_for,
    line_cut_points,
    line_parts,
    log,
    parse_tree,
    percentile,
    pick_holes,
    short_name,
    source_dir_files,
    split_lines,
    hole_record,
    side_by_side,
    table_lines,
    workspace_folders,
)
from lsp_server import languages, prompts  # noqa: E402
from lsp_server.config import Settings, merge  # noqa: E402

PREFERRED_MODEL = "qwen2.5-coder-1.5b"
NAIVE_PREFIX_LINES = 40
NAIVE_SUFFIX_LINES = 10
NAIVE_MAX_TOKENS_SINGLE = 48
NAIVE_MAX_TOKENS_MULTI = 128
MULTI_MIN_LINES = 2
MULTI_MAX_LINES = 6
KINDS = ("single", "multi")
# Acceptance targets.
SINGLE_EM_MARGIN = 0.05
ES_MARGIN = 0.03
LATENCY_RATIO = 1.10

# Syntax nodes that hold a function's or block's statements, per tree-sitter grammar.
BODY_TYPES = {"block", "statement_block", "compound_statement", "constructor_body"}
# Bodies whose statements are declarations rather than code (a Python class body is a "block").
BODY_PARENTS_SKIPPED = {"class_definition"}
# Go wraps a block's statements in one more node.
STATEMENT_LISTS = {"statement_list"}
STRING_TYPES = {"string", "concatenated_string", "string_literal", "template_string"}


# ---- holes -----------------------------------------------------------------------------------------------


def single_line_candidates(text: str, language: str) -> list[int]:
    """Lines of code (no comment, no string) with somewhere to put a mid-line cursor."""
    lines = split_lines(text)
    return [i for i in eligible_lines(text, language) if line_cut_points(lines[i].lstrip(" \t"))]


def cut_single(text: str, line_no: int, rng) -> Cut:
    parts = line_parts(text)
    line = parts[2 * line_no]
    rest = line.lstrip(" \t")
    indent = line[: len(line) - len(rest)]
    cut = rng.choice(line_cut_points(rest))
    parts[2 * line_no] = indent + rest[:cut]
    return Cut(line_no, len(indent) + cut, "single", rest[cut:], "".join(parts))


def _statements(body) -> list:
    out = []
    for child in body.named_children:
        if child.type in STATEMENT_LISTS:
            out.extend(child.named_children)
        else:
            out.append(child)
    return out


def _is_docstring(node) -> bool:
    """A statement that is only a string: a docstring, "use strict"."""
    kids = node.named_children
    return node.type == "expression_statement" and len(kids) == 1 and kids[0].type in STRING_TYPES


def _end_row(node) -> int:
    row, col = node.end_point
    return row - 1 if col == 0 and row > node.start_point[0] else row


def multi_line_candidates(text: str, language: str) -> list[tuple[int, tuple[int, ...]]]:
    """Per body: (first row, the possible last rows), 0-based, of 2-6 whole lines that are the body's
    first statements (one candidate per body, so that no body is holed twice).

    The first statement must start its line (the cursor goes after its indentation), no other statement
    or the body's closing brace may share the last line, and the body must parse without errors."""
    tree = parse_tree(language, text)
    if tree is None:
        return []
    lines = split_lines(text)
    braced = language != "python"
    out: list[tuple[int, tuple[int, ...]]] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.named_children))
        if node.type not in BODY_TYPES or node.has_error:
            continue
        if node.parent is not None and node.parent.type in BODY_PARENTS_SKIPPED:
            continue
        stmts = _statements(node)
        if not stmts or "comment" in stmts[0].type or _is_docstring(stmts[0]):
            continue
        r0, c0 = stmts[0].start_point
        if r0 >= len(lines) or (braced and r0 <= node.start_point[0]):
            continue  # `{ x = 1; ...` : the body starts on the brace's line
        indent = len(lines[r0]) - len(lines[r0].lstrip(" \t"))
        if lines[r0].encode("utf-8")[:c0].strip(b" \t") or indent != c0:  # tree-sitter columns are bytes
            continue  # the statement does not start its line (`if a: b`), or odd indentation
        ends: list[int] = []
        for j, stmt in enumerate(stmts):
            r1 = _end_row(stmt)
            if r1 - r0 + 1 > MULTI_MAX_LINES or r1 >= len(lines):
                break
            if any(len(lines[r]) > MAX_LINE_CHARS for r in range(r0, r1 + 1)):
                break
            nxt = stmts[j + 1] if j + 1 < len(stmts) else None
            if nxt is not None and nxt.start_point[0] <= r1:
                continue  # the next statement starts on this line
            if braced and node.end_point[0] <= r1:
                break  # the closing brace is on this line
            content = sum(len("".join(lines[r].split())) for r in range(r0, r1 + 1))
            if r1 - r0 + 1 >= MULTI_MIN_LINES and content >= 2 * MIN_CONTENT_CHARS:
                ends.append(r1)
        if ends:
            out.append((r0, tuple(ends)))
    return out


def cut_multi(text: str, candidate: tuple[int, tuple[int, ...]], rng) -> Cut:
    r0, ends = candidate
    r1 = rng.choice(ends)
    parts = line_parts(text)
    lines = parts[0::2]
    first = lines[r0]
    indent = first[: len(first) - len(first.lstrip(" \t"))]
    expected = "\n".join([first[len(indent):]] + lines[r0 + 1 : r1 + 1])
    # Keep the first line's indentation and the line end after the last removed line.
    new = parts[: 2 * r0] + [indent] + parts[2 * r1 + 1 :]
    return Cut(r0, len(indent), "multi", expected, "".join(new))


# ---- the naive path ---------------------------------------------------------------------------------------


class NaivePath(LlamaModel):
    """Plain FIM over a fixed line window, as a simple editor integration would do it."""

    def __init__(self, model: Path, settings: Settings, prefix_lines: int, suffix_lines: int,
                 max_tokens_single: int, max_tokens_multi: int) -> None:
        super().__init__(model, settings)
        self.prefix_lines = prefix_lines
        self.suffix_lines = suffix_lines
        self.max_tokens = {"single": max_tokens_single, "multi": max_tokens_multi}

    def window(self, hole: Hole) -> tuple[str, str]:
        parts = line_parts(hole.text)
        n = (len(parts) + 1) // 2
        line = parts[2 * hole.line]
        start = max(0, hole.line - self.prefix_lines)
        prefix = "".join(parts[2 * i] + parts[2 * i + 1] for i in range(start, hole.line)) + line[: hole.column]
        end = min(n, hole.line + 1 + self.suffix_lines)
        suffix = line[hole.column :] + "".join(parts[2 * i - 1] + parts[2 * i] for i in range(hole.line + 1, end))
        return prefix, suffix

    def prompt(self, hole: Hole, max_tokens: int) -> tuple[list[int], int]:
        """The prompt's tokens (template text with special tokens, code without) and how many prefix tokens
        were dropped from its start to leave room for max_tokens in n_ctx (rare: very long lines)."""
        prefix, suffix = self.window(hole)
        segments = prompts.render(
            self.template, {"prefix": prompts.PromptValue(prefix), "suffix": prompts.PromptValue(suffix)}
        )
        pieces = [self._tok_special(s.text) if s.special else self._tok_text(s.text) for s in segments]
        over = len(self.bos()) + sum(map(len, pieces)) + max_tokens - self.llm.n_ctx()
        dropped = 0
        if over > 0:
            k = next(i for i, s in enumerate(segments) if not s.special and s.text == prefix)
            dropped = min(over, len(pieces[k]))
            pieces[k] = pieces[k][dropped:]
        return self.bos() + [t for p in pieces for t in p], dropped

    def complete(self, hole: Hole) -> PathResult:
        res = PathResult()
        try:
            max_tokens = self.max_tokens[hole.kind]
            tokens, dropped = self.prompt(hole, max_tokens)
            stop = list(self.template.stop) + (["\n"] if hole.kind == "single" else [])
            res.extra = {"prompt_tokens": len(tokens), "max_tokens": max_tokens}
            if dropped:
                res.extra["prefix_tokens_dropped"] = dropped
            self._perf_reset()
            t0 = time.perf_counter()
            out = self.llm.create_completion(prompt=tokens, max_tokens=max_tokens, temperature=0.0, stop=stop)
            res.ms = (time.perf_counter() - t0) * 1000.0
            res.extra.update(self._perf_read())
            choice = out["choices"][0]
            res.text = choice.get("text") or ""
            res.nonempty = bool(res.text.strip())
            res.extra["generated_tokens"] = out.get("usage", {}).get("completion_tokens")
            res.extra["finish"] = choice.get("finish_reason")
        except Exception as exc:  # one bad hole must not end the run
            res.error = f"{type(exc).__name__}: {exc}"
        return res


# ---- metrics ---------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), bit-parallel (Myers 1999 / Hyyrö 2001) with
    Python integers as bit vectors: O(len(a)) big-integer steps, fast for texts of thousands of chars."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask = (1 << m) - 1
    top = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & mask
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score


def _unify_eol(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


def normalize_ws(s: str) -> str:
    """Blanks collapsed to one space, each line stripped, blank lines dropped."""
    return "\n".join(" ".join(ln.split()) for ln in _unify_eol(s).split("\n") if ln.strip())


def exact_match(pred: str, expected: str, kind: str) -> bool:
    pred, expected = _unify_eol(pred), _unify_eol(expected)
    if kind == "single":
        return pred.strip() == expected.strip()
    return [ln.rstrip() for ln in pred.strip().split("\n")] == [ln.rstrip() for ln in expected.strip().split("\n")]


def edit_similarity(pred: str, expected: str) -> float:
    a, b = normalize_ws(pred), normalize_ws(expected)
    return 1.0 - levenshtein(a, b) / max(len(a), len(b), 1)


def expected_is_prefix(pred: str, expected: str) -> bool:
    """The expected lines come first in the prediction (which may go on): useful for multi-line holes."""
    p = [ln.rstrip() for ln in _unify_eol(pred).strip().split("\n")]
    e = [ln.rstrip() for ln in _unify_eol(expected).strip().split("\n")]
    return bool(pred.strip()) and p[: len(e)] == e


def score(r: PathResult, hole: Hole) -> dict:
    return {
        "pred": r.text,
        "ms": r.ms,
        "nonempty": r.nonempty,
        "error": r.error,
        "timeout": r.timeout,
        "em": exact_match(r.text, hole.expected, hole.kind),
        "es": edit_similarity(r.text, hole.expected),
        "expected_is_prefix": expected_is_prefix(r.text, hole.expected),
        "extra": r.extra,
    }


# ---- report ----------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> dict:
    n = len(records)
    s: dict = {"holes": n}
    for side in ("lsp", "naive"):
        recs = [r[side] for r in records]
        # A timed-out LSP request counts at the time waited (a lower bound); other failures have no latency.
        ms = [x["ms"] for x in recs if x["ms"] is not None and (not x["error"] or x["timeout"])]
        s[side] = {
            "em": sum(x["em"] for x in recs) / n if n else None,
            "es": sum(x["es"] for x in recs) / n if n else None,
            "p50_ms": percentile(ms, 0.5),
            "p95_ms": percentile(ms, 0.95),
            "nonempty": sum(x["nonempty"] for x in recs) / n if n else None,
            "expected_is_prefix": sum(x["expected_is_prefix"] for x in recs) / n if n else None,
            "errors": sum(bool(x["error"]) and not x["timeout"] for x in recs),
            "timeouts": sum(bool(x["timeout"]) for x in recs),
        }
    return s


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report_groups(records: list[dict], langs: list[str]) -> list[tuple[str, str, list[dict]]]:
    groups = []
    for lang in langs:
        for kind in KINDS:
            recs = [r for r in records if r["language"] == lang and r["kind"] == kind]
            if recs:
                groups.append((lang, kind, recs))
    for kind in KINDS:
        recs = [r for r in records if r["kind"] == kind]
        if recs:
            groups.append(("overall", kind, recs))
    groups.append(("overall", "all", records))
    return groups


def _empty_reason(rec: dict) -> str:
    lsp = rec["lsp"]
    extra = lsp["extra"]
    if lsp["timeout"]:
        return "request timed out"
    if lsp["error"]:
        return lsp["error"]
    if extra.get("reasons"):
        return "reason=" + extra["reasons"][-1]
    if "finish" in extra:
        return f"generated ({extra['mode']} mode, finish={extra['finish']}) but nothing kept after post-processing"
    return "no generation logged: declined before generating (the server logs no reason)"


def print_report(records: list[dict], langs: list[str]) -> None:
    columns = [
        [("language", 11, "<"), ("kind", 6, "<"), ("holes", 5, ">")],
        [("EM LSP", 6, ">"), ("naive", 6, ">")],
        [("ES LSP", 6, ">"), ("naive", 6, ">")],
        [("p50 ms LSP", 10, ">"), ("naive", 6, ">")],
        [("non-empty LSP", 13, ">"), ("naive", 6, ">")],
        [("err/t.o.", 8, ">")],
    ]
    rows = []
    for name, kind, recs in report_groups(records, langs):
        s = summarize(recs)
        lsp, naive = s["lsp"], s["naive"]
        rows.append([
            name, kind, str(s["holes"]),
            _pct(lsp["em"]), _pct(naive["em"]),
            _num(lsp["es"]), _num(naive["es"]),
            fmt_ms(lsp["p50_ms"]), fmt_ms(naive["p50_ms"]),
            _pct(lsp["nonempty"]), _pct(naive["nonempty"]),
            f"{lsp['errors'] + naive['errors']}/{lsp['timeouts']}",
        ])
    print()
    for line in table_lines(columns, rows):
        print(line)
    print("(EM = exact match; ES = edit similarity on whitespace-normalised text; latency p50 in ms, LSP timeouts "
          "counted at the time waited; err/t.o. = failed requests of both paths / LSP timeouts)")

    multi = [r for r in records if r["kind"] == "multi"]
    if multi:
        print(
            f"multi-line: the expected lines begin the prediction (which may go on): LSP "
            f"{sum(r['lsp']['expected_is_prefix'] for r in multi)}/{len(multi)}, naive "
            f"{sum(r['naive']['expected_is_prefix'] for r in multi)}/{len(multi)}"
        )
    single = [r for r in records if r["kind"] == "single"]
    block_mode = [r for r in single if r["lsp"]["extra"].get("mode") == "block"]
    if block_mode:
        print(f"single-line holes the server answered in block mode (cursor after a block opener): "
              f"{len(block_mode)}/{len(single)}")
    prompt_lsp = [r["lsp"]["extra"]["prompt_tokens"] for r in records if "prompt_tokens" in r["lsp"]["extra"]]
    prompt_naive = [r["naive"]["extra"]["prompt_tokens"] for r in records if "prompt_tokens" in r["naive"]["extra"]]
    if prompt_lsp and prompt_naive:
        print(f"prompt tokens p50: LSP {percentile(prompt_lsp, 0.5):.0f} (server log), naive {percentile(prompt_naive, 0.5):.0f}")
    for kind in KINDS:
        gen_lsp = [r["lsp"]["extra"]["generated_tokens"] for r in records
                   if r["kind"] == kind and r["lsp"]["extra"].get("generated_tokens") is not None]
        gen_naive = [r["naive"]["extra"]["generated_tokens"] for r in records
                     if r["kind"] == kind and r["naive"]["extra"].get("generated_tokens") is not None]
        if gen_lsp and gen_naive:
            print(f"generated tokens mean, {kind}: LSP {sum(gen_lsp) / len(gen_lsp):.1f}, "
                  f"naive {sum(gen_naive) / len(gen_naive):.1f}")
    finishes: dict[str, int] = {}
    for r in records:
        f = r["lsp"]["extra"].get("finish")
        if f:
            finishes[f] = finishes.get(f, 0) + 1
    if finishes:
        print("LSP finish reasons (server log): " + ", ".join(f"{k} {v}" for k, v in sorted(finishes.items())))
    dropped = [r for r in records if r["naive"]["extra"].get("prefix_tokens_dropped")]
    if dropped:
        print(f"naive prompts cut to fit n_ctx: {len(dropped)}")
    lsp_only_empty = [r for r in records if not r["lsp"]["nonempty"] and r["naive"]["nonempty"]]
    naive_only_empty = [r for r in records if r["lsp"]["nonempty"] and not r["naive"]["nonempty"]]
    print(f"LSP empty where naive answered: {len(lsp_only_empty)}/{len(records)}; "
          f"naive empty where LSP answered: {len(naive_only_empty)}/{len(records)}")
    reasons: dict[str, int] = {}
    for r in lsp_only_empty:
        key = f"{r['kind']}: {_empty_reason(r)}"
        reasons[key] = reasons.get(key, 0) + 1
    for key, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count} x {key}")

    overall = summarize(records)
    by_kind = {kind: summarize(recs) for name, kind, recs in report_groups(records, langs) if name == "overall"}
    print()

    def verdict(label: str, lsp: float | None, naive: float | None, target: str, ok) -> None:
        if lsp is None or naive is None:
            print(f"VERDICT {label}: SKIPPED (no holes or no timing)")
            return
        print(f"VERDICT {label}: LSP {lsp:.3f} vs naive {naive:.3f} (target {target}): {'PASS' if ok(lsp, naive) else 'MISS'}")

    single_s = by_kind.get("single", {"lsp": {"em": None}, "naive": {"em": None}})
    multi_s = by_kind.get("multi", {"lsp": {"em": None}, "naive": {"em": None}})
    verdict("single-line EM", single_s["lsp"]["em"], single_s["naive"]["em"],
            f"LSP >= naive + {SINGLE_EM_MARGIN:.2f}", lambda a, b: a >= b + SINGLE_EM_MARGIN - 1e-9)
    verdict("ES overall", overall["lsp"]["es"], overall["naive"]["es"],
            f"LSP >= naive + {ES_MARGIN:.2f}", lambda a, b: a >= b + ES_MARGIN - 1e-9)
    verdict("multi-line EM", multi_s["lsp"]["em"], multi_s["naive"]["em"], "LSP >= naive", lambda a, b: a >= b)
    lp, np_ = overall["lsp"]["p50_ms"], overall["naive"]["p50_ms"]
    if lp is None or not np_:
        print("VERDICT latency p50: SKIPPED (no timing)")
    else:
        ok = lp <= LATENCY_RATIO * np_
        print(f"VERDICT latency p50: LSP {lp:.0f} ms / naive {np_:.0f} ms = {lp / np_:.3f} "
              f"(target <= {LATENCY_RATIO:.2f}): {'PASS' if ok else 'MISS'}")


# ---- main ------------------------------------------------------------------------------------------------


def default_model(name: str | None) -> Path:
    from lsp_server.models import installed_path, resolve_model

    if name:
        return resolve_model(name)
    try:
        preferred = installed_path(PREFERRED_MODEL)
    except Exception:
        preferred = None
    return preferred if preferred is not None else resolve_model(None)


def collect_sources(wanted: list[str], use_defaults: bool, source_dirs: list[str]) -> tuple[dict[str, list], list[str]]:
    notes: list[str] = []
    by_lang: dict[str, list] = {}
    if use_defaults:
        for lang in wanted:
            finder = DEFAULT_SOURCES.get(lang)
            if finder is None:
                continue
            files, note = finder()
            notes.append(note)
            by_lang.setdefault(lang, []).extend(files)
    for d in source_dirs:
        if not Path(d).is_dir():
            log(f"--source-dir {d}: not a directory, ignored")
            continue
        found = 0
        for p in source_dir_files(d):
            info = language_for(p)
            if info is not None and info.name in wanted:
                by_lang.setdefault(info.name, []).append(p)
                found += 1
        notes.append(f"source dir {d}: {found} files")
    return by_lang, notes


def main(argv: list[str] | None = None) -> int:
    all_langs = [i.name for i in languages.LANGUAGES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help=f"GGUF file or installed model name (default: {PREFERRED_MODEL} if installed, "
                    "else the installed default model)")
    ap.add_argument("--holes", type=int, default=30, help="holes per language, half of each kind (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for choosing files and holes (default 0)")
    ap.add_argument("--languages", default="",
                    help=f"comma-separated, from {','.join(all_langs)} (default: every one with sources)")
    ap.add_argument("--source-dir", action="append", default=[], metavar="DIR",
                    help="add your own code (language by file extension); repeatable")
    ap.add_argument("--no-default-sources", action="store_true",
                    help="don't look for code on this machine, only use --source-dir")
    ap.add_argument("--list-sources", action="store_true", help="print the sources found per language and exit")
    ap.add_argument("--json-out", metavar="FILE", help="write every per-hole record here")
    ap.add_argument("--records-out", metavar="FILE", help="append each per-hole record as a JSON line as soon as it is done")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N holes of the (deterministic) list: resume a run")
    ap.add_argument("--prefix-lines", type=int, default=NAIVE_PREFIX_LINES,
                    help=f"naive window: lines before the cursor line (default {NAIVE_PREFIX_LINES})")
    ap.add_argument("--suffix-lines", type=int, default=NAIVE_SUFFIX_LINES,
                    help=f"naive window: lines after the cursor line (default {NAIVE_SUFFIX_LINES})")
    ap.add_argument("--naive-max-tokens-single", type=int, default=NAIVE_MAX_TOKENS_SINGLE,
                    help=f"naive max_tokens for single-line holes (default {NAIVE_MAX_TOKENS_SINGLE})")
    ap.add_argument("--naive-max-tokens-multi", type=int, default=NAIVE_MAX_TOKENS_MULTI,
                    help=f"naive max_tokens for multi-line holes (default {NAIVE_MAX_TOKENS_MULTI})")
    ap.add_argument("--settings", default="{}", help='server settings for the LSP path, JSON as initializationOptions, '
                    'e.g. \'{"completion": {"maxSuffixTokens": 24}}\'')
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per LSP request (default 120)")
    ap.add_argument("--load-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    ap.add_argument("--server-log", default=str(REPO / "build" / "eval_fim_server.log"),
                    help="the server's stderr (default build/eval_fim_server.log)")
    args = ap.parse_args(argv)

    wanted = [x.strip() for x in args.languages.split(",") if x.strip()] or all_langs
    unknown = [x for x in wanted if x not in all_langs]
    if unknown:
        ap.error(f"unknown language(s): {', '.join(unknown)}; known: {', '.join(all_langs)}")
    by_lang, notes = collect_sources(wanted, not args.no_default_sources, args.source_dir)
    order = [name for name in wanted if by_lang.get(name)]
    missing = [name for name in wanted if not by_lang.get(name)]
    if args.list_sources:
        for n in notes:
            print(f"source: {n}")
        for lang in all_langs:
            if lang in wanted:
                print(f"{lang:<11} {len(by_lang.get(lang, [])):>6} files")
        return 0

    # Holes: per language, the single-line ones, then the multi-line ones.
    holes: list[Hole] = []
    n_multi = args.holes // 2
    n_single = args.holes - n_multi
    kinds = {"single": (n_single, single_line_candidates, cut_single),
             "multi": (n_multi, multi_line_candidates, cut_multi)}
    for lang in order:
        for kind, (count, candidates, cut) in kinds.items():
            if count <= 0:
                continue
            rng = random.Random(f"{args.seed}-{lang}-{kind}")
            picked = pick_holes(by_lang[lang], lang, count, rng, len(holes), candidates=candidates, cut=cut)
            if len(picked) < count:
                notes.append(f"{lang}: only {len(picked)} {kind}-line holes found")
            holes.extend(picked)
    for i, h in enumerate(holes):
        h.index = i
    if not holes:
        log("no source files with usable holes; nothing to measure")
        for n in notes:
            log("  " + n)
        return 2
    warm = pick_holes(by_lang[order[0]], order[0], 1, random.Random(f"{args.seed}-warmup"), 10_000,
                      candidates=single_line_candidates, cut=cut_single)
    warmup = warm[0] if warm else holes[0]
    warmup.index = 10_000

    model = default_model(args.model)
    settings = Settings()
    merge(settings, json.loads(args.settings), source="--settings")
    cs = settings.completion
    print(f"model: {model}")
    print(
        f"LSP settings: plan {plan_for_file(model, n_ctx=settings.model.n_ctx)[0].summary()}; "
        f"prefix<={cs.max_prefix_tokens} suffix<={cs.max_suffix_tokens} tokens, "
        f"max_tokens line/block={cs.max_tokens_single_line}/{cs.max_tokens_multi_line}, max_lines={cs.max_lines}"
    )
    print(
        f"naive: {args.prefix_lines} lines before + cursor line + {args.suffix_lines} lines after, temperature 0, "
        f"max_tokens single/multi={args.naive_max_tokens_single}/{args.naive_max_tokens_multi}, "
        "stops: EOG, template stops, line end (single); seed=" + str(args.seed)
    )
    for n in notes:
        print(f"source: {n}")
    if missing:
        print("no sources: " + ", ".join(missing))
    print("holes: " + ", ".join(
        f"{lang} {sum(h.language == lang and h.kind == 'single' for h in holes)}+"
        f"{sum(h.language == lang and h.kind == 'multi' for h in holes)}" for lang in order
    ) + " (single+multi)")

    lsp: LspPath | None = None
    records: list[dict] = []
    template_family = None
    try:
        log(f"starting the server (log: {args.server_log}) ...")
        workspace = workspace_folders({lang: by_lang[lang] for lang in order})
        lsp = LspPath(model, Path(args.server_log), args.timeout, client_name="eval_fim", keep_log=True, workspace=workspace,
                      settings=json.loads(args.settings))
        lsp.start()
        log("loading the model for the naive path ...")
        t0 = time.perf_counter()
        naive = NaivePath(model, settings, args.prefix_lines, args.suffix_lines,
                          args.naive_max_tokens_single, args.naive_max_tokens_multi)
        template_family = naive.template.family
        log(f"naive model loaded in {time.perf_counter() - t0:.1f} s (template {template_family})")
        status = lsp.wait_ready(args.load_timeout)
        log(f"server ready (family {status.get('family')}, worker pid {status.get('workerPid')})")
        if status.get("family") and status.get("family") != template_family:
            log(f"WARNING: the server uses template {status.get('family')}, the naive path {template_family}")

        log("warming up both paths ...")
        w1 = lsp.complete(warmup)
        w2 = naive.complete(warmup)
        log(f"warm-up: LSP {fmt_ms(w1.ms)} ms {w1.error or ''}, naive {fmt_ms(w2.ms)} ms {w2.error or ''}")

        for k, hole in enumerate(holes):
            if k < args.skip:
                continue
            r_lsp, r_naive, lsp_first = side_by_side(k, hole, lsp, naive)
            rec = {
                **hole_record(hole),
                "order": "lsp-first" if lsp_first else "naive-first",
                "lsp": score(r_lsp, hole),
                "naive": score(r_naive, hole),
            }
            records.append(rec)
            if args.records_out:
                with open(args.records_out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

            def state(s: dict) -> str:
                if s["timeout"]:
                    return "timeout"
                if s["error"]:
                    return "error: " + s["error"]
                return ("EM" if s["em"] else f"ES {s['es']:.2f}") if s["nonempty"] else "empty"

            log(
                f"[{k + 1}/{len(holes)}] {hole.language} {hole.kind} {short_name(hole.path)}:{hole.line + 1}  "
                f"LSP {fmt_ms(r_lsp.ms)} ms ({state(rec['lsp'])})  naive {fmt_ms(r_naive.ms)} ms ({state(rec['naive'])})"
            )
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
    finally:
        if lsp is not None:
            lsp.close()

    if records:
        print_report(records, order)
    if args.json_out:
        out = {
            "model": str(model),
            "template": template_family,
            "seed": args.seed,
            "holes_per_language": args.holes,
            "naive": {
                "prefix_lines": args.prefix_lines,
                "suffix_lines": args.suffix_lines,
                "max_tokens_single": args.naive_max_tokens_single,
                "max_tokens_multi": args.naive_max_tokens_multi,
            },
            "settings": asdict(settings),
            "notes": notes,
            "summary": {f"{name}/{kind}": summarize(recs) for name, kind, recs in report_groups(records, order)}
            if records else {},
            "records": records,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"per-hole records: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
