#!/usr/bin/env python3
"""Rewrite `contributes.configuration` in editor-clients/vscode/package.json from the settings tree
(lsp_server/config.py), plus the few settings only the extension reads (how to start the server, LSP
tracing).

tests/test_vscode_client.py fails when package.json is stale; run this to refresh it:
    .venv/bin/python scripts/vscode_settings.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, get_type_hints

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lsp_server.config import Settings, _camel, field_docs  # noqa: E402

PACKAGE_JSON = REPO / "editor-clients" / "vscode" / "package.json"
PREFIX = "offpilot"
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}

# Read by the extension itself and never sent to the server (src/server.ts: CLIENT_ONLY_SECTIONS, and
# vscode-languageclient reads `offpilot.trace.server`).
CLIENT_SETTINGS: dict[str, dict[str, Any]] = {
    f"{PREFIX}.server.command": {
        "type": ["array", "string"],
        "items": {"type": "string"},
        "default": [],
        "markdownDescription": "The command that starts the server over stdio: an array (program and arguments, "
        "e.g. `[\"/path/to/offpilot/.venv/bin/offpilot\", \"serve\"]`) or one command line. `${workspaceFolder}` "
        "is replaced. Empty: `.venv/bin/offpilot serve` from `#offpilot.server.root#`, else from the workspace "
        "folder or a folder above it, else `offpilot` on the PATH. Changing it restarts the server.",
    },
    f"{PREFIX}.server.root": {
        "type": "string",
        "default": "",
        "markdownDescription": "The offpilot checkout whose `.venv/bin/offpilot` (made by `scripts/setup`) runs "
        "the server; a relative path is taken from the workspace folder. Used when `#offpilot.server.command#` "
        "is empty.",
    },
    f"{PREFIX}.trace.server": {
        "type": "string",
        "enum": ["messages", "verbose"],
        "default": "messages",
        "markdownDescription": "How much of the LSP traffic between VS Code and the server the offpilot output "
        "channel shows once its log level is Trace (**Developer: Set Log Level...** → offpilot): the "
        "messages, or the messages with their contents.",
    },
}


# Server settings the extension sets itself, so they are not offered in VS Code's settings: it shows
# explanations in its own panel (src/extension.ts), so the server need not open them as files too.
SET_BY_CLIENT = {f"{PREFIX}.actions.showDocument"}


def _property(typ: type, default: Any, doc: str, order: int) -> dict[str, Any]:
    prop: dict[str, Any] = {"type": JSON_TYPES[typ], "default": default}
    # The server refuses negative numbers except where the default itself is negative (-1 = automatic).
    if typ in (int, float) and default >= 0:
        prop["minimum"] = 0
    prop["markdownDescription"] = " ".join(doc.split())
    prop["order"] = order
    return prop


def configuration() -> list[dict[str, Any]]:
    """`contributes.configuration`: one titled group per section of the settings tree, then the extension's."""
    groups = []
    defaults = Settings()
    section_docs = field_docs(Settings)
    for section in dataclasses.fields(Settings):
        value = getattr(defaults, section.name)
        docs = field_docs(type(value))
        hints = get_type_hints(type(value))
        properties = {}
        for order, f in enumerate(dataclasses.fields(value)):
            key = f"{PREFIX}.{_camel(section.name)}.{_camel(f.name)}"
            if key in SET_BY_CLIENT:
                continue
            properties[key] = _property(hints[f.name], getattr(value, f.name), docs.get(f.name, ""), order)
        title = section_docs.get(section.name, "").rstrip(".") or section.name
        groups.append({"id": f"{PREFIX}.{_camel(section.name)}", "title": title, "properties": properties})
    groups.append({"id": f"{PREFIX}.client", "title": "Starting the server (VS Code only)", "properties": CLIENT_SETTINGS})
    return groups


def render(package: dict[str, Any]) -> str:
    package = dict(package)
    package["contributes"] = {**package.get("contributes", {}), "configuration": configuration()}
    return json.dumps(package, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    package = json.loads(PACKAGE_JSON.read_text(encoding="utf-8"))
    PACKAGE_JSON.write_text(render(package), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
