"""Allocation sites for leak hunting (scripts/soak.py): with PYTHONTRACEMALLOC=1 in the server's environment,
offpilot/memory lists the top sites by size, and those that grew most since the previous call; otherwise
nothing (tracing costs ~2x CPU, so it is off by default)."""

from __future__ import annotations

import tracemalloc

_previous: tracemalloc.Snapshot | None = None


def _site(stat) -> str:
    frame = stat.traceback[0]
    return f"{frame.filename}:{frame.lineno}"


def top_sites(limit: int = 10) -> dict | None:
    global _previous
    if not tracemalloc.is_tracing():
        return None
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ))
    top = [{"site": _site(s), "kb": round(s.size / 1024, 1), "count": s.count} for s in snapshot.statistics("lineno")[:limit]]
    grown = []
    if _previous is not None:
        grown = [{"site": _site(d), "grew_kb": round(d.size_diff / 1024, 1), "count_diff": d.count_diff}
                 for d in snapshot.compare_to(_previous, "lineno")[:limit] if d.size_diff > 0]
    _previous = snapshot
    return {"top": top, "grown": grown}
