"""Document store on a huge document (reliability.md C8): time to apply 1-character didChange edits to a
10 MB document, the one-off cost of opening it, reading its text back for a request, and the memory it takes.

    .venv/bin/python scripts/bench_documents.py [--mb 10] [--edits 2000] [--seed 1]

Needs only the standard library and lsp_server/documents.py (runs on a bare machine as `python3`).
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lsp_server.documents import UTF8, UTF16, DocumentStore, TextChange  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--edits", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    line = "    value = compute(alpha, beta) + 12345  # a comment, é 名 😀\r\n"
    text = line * int(args.mb * 1e6 / len(line.encode()))
    size_mb = len(text.encode()) / 1e6
    gc.collect()
    base = rss_mb()
    store = DocumentStore()
    t0 = time.perf_counter()
    doc = store.open("file:///big.py", "python", 1, text)
    open_ms = (time.perf_counter() - t0) * 1000
    del text
    lines = doc.line_count
    rows = []
    for encoding in (UTF16, UTF8):
        times = []
        for _ in range(args.edits):
            ln = rng.randrange(lines - 1)
            kind = rng.random()
            if kind < 0.7:  # type a character
                change = TextChange("x", ((ln, 4), (ln, 4)))
            elif kind < 0.9:  # delete one
                change = TextChange("", ((ln, 4), (ln, 5)))
            else:  # Enter
                change = TextChange("\r\n    ", ((ln, 10), (ln, 10)))
            t0 = time.perf_counter()
            store.change(doc.uri, doc.version + 1, [change], encoding)
            times.append((time.perf_counter() - t0) * 1000)
        rows.append((encoding, percentile(times, 50), percentile(times, 99), max(times)))
    t0 = time.perf_counter()
    joined = doc.text
    join_ms = (time.perf_counter() - t0) * 1000
    rss = rss_mb() - base
    print(f"document: {size_mb:.1f} MB, {lines} lines (CRLF, multibyte); open {open_ms:.0f} ms; "
          f"reading the whole text back once after edits {join_ms:.1f} ms")
    print(f"{'encoding':<8} {'edits':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for encoding, p50, p99, worst in rows:
        print(f"{encoding:<8} {args.edits:>6} {p50:>8.3f} {p99:>8.3f} {worst:>8.3f}")
    print(f"RSS after open + edits + one read: +{rss:.0f} MB ({rss / size_mb:.1f} x the document; "
          f"budget 3 x + 100 MB = {3 * size_mb + 100:.0f} MB)")
    assert len(joined) > 0


if __name__ == "__main__":
    main()
