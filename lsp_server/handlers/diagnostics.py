"""offpilot/memory: the server's top allocation sites, for leak hunting (scripts/soak.py --tracemalloc).
Asked for on its own because a tracemalloc snapshot takes seconds: offpilot/status stays cheap."""

from __future__ import annotations

from ..memory import top_sites


def memory(ls, params) -> dict:
    return {"tracemalloc": top_sites()}
