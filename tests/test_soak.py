"""The soak (reliability.md A8) and the chaos soak (E7) at CI size: scripts/soak.py runs the full sizes."""

from __future__ import annotations

import importlib.util

from lsp_raw import REPO


# ---- A8, E7: the soak (scripts/soak.py), at CI size ------------------------------------------------------


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", REPO / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_soak_short_no_leaks():
    """A tenth of the full soak: 1,000 edits, 500 inline requests, 100 open/close cycles, bounds scaled."""
    soak = _soak_module()
    result = await soak.Soak(soak.parse_args(["--changes", "1000", "--requests", "500", "--cycles", "100"])).run()
    soak.print_table(result)
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["open_documents_end"] == 0 and result["missing"] == 0 and result["duplicated"] == 0


async def test_soak_short_chaos():
    """500 edits with a fault every 25 (worker SIGKILL, cache folder 0500 with its database overwritten, bad
    frames): the server stays up, answers after each fault, and logs no traceback."""
    soak = _soak_module()
    result = await soak.Soak(soak.parse_args(["--changes", "500", "--requests", "250", "--cycles", "50", "--chaos",
                                              "--fault-every", "25", "--seed", "3", "--max-kills", "2"])).run()
    soak.print_table(result)
    assert sum(result["faults"].values()) >= 20 and result["faults"]["cache_broken"] >= 5
    assert result["faults"]["worker_killed"] >= 1
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["log_tracebacks"] == 0
