"""offpilot/memory: the server's top allocation sites, for leak hunting (scripts/soak.py --tracemalloc).
Asked for on its own because a tracemalloc snapshot takes seconds: offpilot/status stays cheap."""

from __future__ import annotations

from ..memory import top_sites


def memory(ls, params) -> dict:
    # pygls's table of running handlers: it must not grow with the number of messages handled.
    return {"tracemalloc": top_sites(), "handlerFutures": len(getattr(ls.protocol, "_request_futures", {}))}
