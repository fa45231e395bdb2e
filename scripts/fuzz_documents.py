"""Long runs of the document-sync properties (reliability.md C2-C4, C6), beyond what CI runs per push.

    .venv/bin/python scripts/fuzz_documents.py [--sessions 10000] [--steps 20] [--jobs 4] [--split 1] [--tree-edits 10000]
        [--machines SyncUtf8,SyncUtf16,SyncUtf32,SyncChunkedUtf8,SyncChunkedUtf16]

--sessions: hypothesis sessions per state machine (UTF-8, UTF-16, UTF-32, and chunked UTF-8/UTF-16), each of at
most --steps edit batches, the strict store against the reference in tests/sync_machine.py; --tree-edits:
random edits per grammar, after each of which the incremental tree must equal a fresh parse (skipped when
tree_sitter is not installed). Prints a table; exits 1 on the first counterexample (which hypothesis prints).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run_machine(args: tuple[str, int, int, bool]) -> tuple[str, int, float, str]:
    import logging

    from hypothesis import settings
    from hypothesis.stateful import run_state_machine_as_test

    import sync_machine

    logging.disable(logging.CRITICAL)  # every rejected batch logs a warning: millions here
    name, sessions, steps, derandomize = args
    machine = getattr(sync_machine, name)
    t0 = time.perf_counter()
    try:
        run_state_machine_as_test(machine, settings=settings(sync_machine.MACHINE_SETTINGS, max_examples=sessions,
                                                             stateful_step_count=steps, database=None, derandomize=derandomize))
        error = ""
    except BaseException as exc:  # the counterexample is printed by hypothesis
        error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return name, sessions, time.perf_counter() - t0, error


def run_trees(edits: int, seed: int = 1) -> list[tuple[str, int, float, str]]:
    try:
        from lsp_server.context.syntax import TreeCache, parse_bytes
    except ImportError as exc:
        return [("trees", 0, 0.0, f"skipped: {exc}")]
    samples = {
        "python": "def f(x):\r\n    s = '名前😀'\n    return x + 1\n",
        "javascript": "function f(x) {\n  const s = '值😀';\r\n  return x + 1;\n}\n",
        "rust": "fn f(x: i32) -> i32 {\n    let s = \"é😀\";\n    x + 1\n}\n",
        "go": "package m\n\nfunc f(x int) int {\n\ts := \"名\"\n\treturn x + 1\n}\n",
        "c": "int f(int x) {\n  char *s = \"😀\";\r\n  return x + 1;\n}\n",
    }
    pieces = ["x", " ", "(", ")", "{", "}", "\n", "\r\n", "é", "😀", "名", ";", "return ", "'", "\"", "#", "//", "def g():\n"]
    rows = []
    for language, text in samples.items():
        rng = random.Random(seed)
        cache = TreeCache()
        t0 = time.perf_counter()
        error = ""
        for n in range(edits):
            if len(text) > 4000:
                text = text[:2000]
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            j = min(j, i + rng.choice([0, 1, 3, 20]))
            text = text[:i] + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 3))) + text[j:]
            data = text.encode("utf-8", "surrogatepass")
            if str(cache.parse("k", language, data, None).root_node) != str(parse_bytes(language, data).root_node):
                error = f"edit {n}: incremental tree differs from a fresh parse for {text!r}"
                break
        rows.append((f"trees/{language}", edits, time.perf_counter() - t0, error))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=min(5, multiprocessing.cpu_count()))
    ap.add_argument("--split", type=int, default=1, help="processes per machine (random seeds instead of the fixed one)")
    ap.add_argument("--tree-edits", type=int, default=10_000)
    ap.add_argument("--machines", default="SyncUtf8,SyncUtf16,SyncUtf32,SyncChunkedUtf8,SyncChunkedUtf16")
    args = ap.parse_args()
    names = args.machines.split(",")
    rows = []
    if args.sessions:
        per = -(-args.sessions // args.split)
        jobs = [(name, per, args.steps, args.split == 1) for name in names for _ in range(args.split)]
        results = []
        with multiprocessing.Pool(args.jobs) as pool:
            for result in pool.imap_unordered(run_machine, jobs):  # progress as parts finish
                results.append(result)
                print(f"  part done: {result[0]} {result[1]} sessions in {result[2]:.0f} s {result[3] or 'ok'}", flush=True)
        for name in names:  # one row per machine: sessions summed, wall time of its slowest part
            mine = [r for r in results if r[0] == name]
            rows.append((name, sum(r[1] for r in mine), max(r[2] for r in mine), "; ".join(r[3] for r in mine if r[3])))
    if args.tree_edits:
        rows += run_trees(args.tree_edits)
    print(f"{'check':<22} {'runs':>8} {'seconds':>9}  result")
    for name, runs, seconds, error in rows:
        print(f"{name:<22} {runs:>8} {seconds:>9.1f}  {error or 'ok'}")
    return 1 if any(error and not error.startswith("skipped") for *_, error in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
