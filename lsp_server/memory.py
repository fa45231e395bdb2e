"""Allocation sites for leak hunting (scripts/soak.py): with PYTHONTRACEMALLOC=1 in the server's environment,
offpilot/memory lists the top sites by size; otherwise nothing (tracing costs ~2x CPU, so it is off by default)."""

from __future__ import annotations

import tracemalloc


def top_sites(limit: int = 10) -> list[dict] | None:
    if not tracemalloc.is_tracing():
        return None
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ))
    return [{"site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "kb": round(s.size / 1024, 1), "count": s.count}
            for s in snapshot.statistics("lineno")[:limit]]
