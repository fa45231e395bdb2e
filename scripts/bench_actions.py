#!/usr/bin/env python3
"""Completion latency while an explanation generates, against the same completions with the model idle.

One server (the real model), one real source file we did not write (default: the standard library's
json/decoder.py). The same holes (a line cut in its middle) are completed three times: idle, while
`offpilot.explain` runs on a function of the file (a new one starts whenever the last finishes), and idle
again. Cache and prefetch are off so every completion runs the model. Prints p50/p95 for both and the
ratio busy/idle, how many explanations finished and how long they took, and how long the same
explanation takes with no completions.

    .venv/bin/python scripts/bench_actions.py [--model M] [--file F] [--holes 10]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from holes import LspClient, log, percentile  # noqa: E402

OPTIONS = {"cache": {"enabled": False}, "completion": {"prefetch": False}, "actions": {"showDocument": False}}


def pick_function(text: str) -> int:
    """Line (0-based) inside the longest top-level function or method of a Python file."""
    best = max((n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
               key=lambda n: (n.end_lineno or n.lineno) - n.lineno)
    return best.lineno  # the line after `def` (1-based lineno is the 0-based next line)


def pick_holes(text: str, count: int, seed: int) -> list[tuple[int, int]]:
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if len(line.strip()) > 12 and not line.strip().startswith(("#", '"', "'"))]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, min(count, len(candidates))))
    return [(i, len(lines[i]) - len(lines[i].lstrip()) + len(lines[i].strip()) // 2) for i in chosen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="GGUF file or installed model name (default: the installed default)")
    parser.add_argument("--file", default=str(Path(json.__file__).with_name("decoder.py")))
    parser.add_argument("--holes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap-ms", type=int, default=200, help="pause between completions, as a person reading")
    parser.add_argument("--server-log", default=str(REPO / "build" / "bench_actions_server.log"))
    args = parser.parse_args()

    text = Path(args.file).read_text(encoding="utf-8")
    uri = Path(args.file).resolve().as_uri()
    holes = pick_holes(text, args.holes, args.seed)
    function_line = pick_function(text)
    Path(args.server_log).parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "offpilot"), "serve"] + (["--model", args.model] if args.model else [])
    with open(args.server_log, "w") as err:
        client = LspClient(cmd, err, str(REPO))
        try:
            return run(client, text, uri, holes, function_line, args)
        finally:
            client.close()


def run(client: LspClient, text: str, uri: str, holes, function_line: int, args) -> int:
    caps = {"window": {"workDoneProgress": False}, "textDocument": {"inlineCompletion": {}}}
    client.request("initialize", {"processId": None, "rootUri": None, "capabilities": caps, "initializationOptions": OPTIONS}, 60)
    client.notify("initialized", {})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = (client.request("offpilot/status", {}, 10)[0] or {}).get("result") or {}
        if status.get("state") in ("ready", "failed"):
            break
        time.sleep(0.2)
    if status.get("state") != "ready":
        log(f"model not ready: {status}")
        return 1
    log(f"model {status.get('model')} ready; file {args.file}, {len(holes)} holes, explain at line {function_line + 1}")
    version = 1
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": version, "text": text}})
    lines = text.split("\n")
    explain_args = {"uri": uri, "range": {"start": {"line": function_line, "character": 0}, "end": {"line": function_line, "character": 0}}}

    def complete(line: int, column: int) -> float:
        nonlocal version
        holed = lines[:line] + [lines[line][:column]] + lines[line + 1 :]
        version += 1
        client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"text": "\n".join(holed)}]})
        params = {"textDocument": {"uri": uri}, "position": {"line": line, "character": column}, "context": {"triggerKind": 1}}
        reply, seconds = client.request("textDocument/inlineCompletion", params, 300)
        if reply is None or "error" in reply:
            log(f"completion failed at {line + 1}:{column}: {reply}")
        time.sleep(args.gap_ms / 1000.0)
        return seconds * 1000.0

    # Warm-up: the first request pays one-time costs (imports, the grammar) in both phases' place.
    complete(*holes[0])
    idle = [complete(*h) for h in holes]
    busy: list[float] = []
    explains: list[float] = []
    overlapped = 0
    pending = None
    for hole in holes:
        if pending is not None and client.peek_reply(pending[0]) is not None:
            reply, arrived = client.peek_reply(pending[0])
            explains.append((arrived - pending[1]) * 1000.0)
            client.forget_reply(pending[0])
            pending = None
        if pending is None:
            pending = client.request_nowait("workspace/executeCommand", {"command": "offpilot.explain", "arguments": [explain_args]})
            time.sleep(1.0)  # let it start generating
        busy.append(complete(*hole))
        overlapped += client.peek_reply(pending[0]) is None  # still generating after this completion
    markdown = ""
    if pending is not None:
        reply, _ = None, 0.0
        while client.peek_reply(pending[0]) is None and client.proc.poll() is None:
            time.sleep(0.1)
        reply, arrived = client.peek_reply(pending[0])
        explains.append((arrived - pending[1]) * 1000.0)
        markdown = ((reply or {}).get("result") or {}).get("markdown", "")
    idle_again = [complete(*h) for h in holes]
    idle_all = idle + idle_again
    alone, alone_s = client.request("workspace/executeCommand", {"command": "offpilot.explain", "arguments": [explain_args]}, 600)

    def row(name: str, values: list[float]) -> str:
        return f"{name:<28} n={len(values):>3}  p50 {percentile(values, 0.5):8.0f} ms  p95 {percentile(values, 0.95):8.0f} ms"

    print(row("completions, model idle", idle_all))  # stdout-ok
    print(row("completions, explain running", busy))  # stdout-ok
    print(f"ratio p50 busy/idle: {percentile(busy, 0.5) / percentile(idle_all, 0.5):.2f} "  # stdout-ok
          f"(idle before {percentile(idle, 0.5):.0f} ms, after {percentile(idle_again, 0.5):.0f} ms)")
    print(f"completions answered while an explanation was still generating: {overlapped}/{len(busy)}")  # stdout-ok
    print(f"explanations finished: {len(explains)}, each {', '.join(f'{ms / 1000:.1f} s' for ms in explains)} "  # stdout-ok
          "(from the request, completions taking their turn first)")
    print(f"the same explanation with no completions: {alone_s:.1f} s"  # stdout-ok
          + ("" if alone and "result" in alone else f" (failed: {alone})"))
    if markdown:
        print("--- last explanation ---\n" + markdown)  # stdout-ok
    return 0


if __name__ == "__main__":
    sys.exit(main())
