#!/usr/bin/env python3
"""Rewrite the README's settings table from the settings tree (lsp_server/config.py).

tests/test_prompts_and_text.py fails when the README's copy is stale; run this to refresh it:
    .venv/bin/python scripts/readme_settings.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lsp_server.config import settings_table  # noqa: E402

HEADER = "| setting | default | meaning |"


def main() -> int:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    start = text.index(HEADER)
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end + 1
    readme.write_text(text[:start] + settings_table() + text[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
