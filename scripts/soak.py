"""Soak the real server over stdio with a scripted model (reliability.md A8, and E7 with --chaos).

    .venv/bin/python scripts/soak.py                          # 10,000 didChange, 5,000 inline, 1,000 open/close
    .venv/bin/python scripts/soak.py --changes 1000 --requests 500 --cycles 100   # the CI size
    .venv/bin/python scripts/soak.py --tracemalloc            # also the server's top allocation sites
    .venv/bin/python scripts/soak.py --chaos --seed 7         # random faults: worker SIGKILL, cache folder
                                                              # broken, bad frames; counts errors in the log

Checks (exit status 1 when one fails): every request answered exactly once; RSS growth of the server and
of its worker (psutil) under the bound (50 MB at the full size, scaled down with --changes, 10 MB at least);
open fds back to the baseline ±5; offpilot/status's openDocuments 0 after closing all; with --tracemalloc,
no top-10 site of the end growing more than 1 MB over the second half; with --chaos, the server alive at
the end, 0 Python tracebacks in its log, answers after every fault. Prints a table and, with --json, one object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from lsp_raw import RawClient, inline_params  # noqa: E402

FAKE = {"outputs": ["value + 1", "x * 2", "len(items)"], "token_delay_ms": 1}
DOC = "def f(value, items):\n    total = 0\n    return \n"
OPEN_DOCS = 4
WINDOW = 0
"""Inline requests left unanswered before the driver waits (an editor waits for each; more in flight would
only supersede each other)."""


def rss_mb(pid: int | None) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else 0.0
    except psutil.NoSuchProcess:
        return 0.0


def fds(pid: int | None) -> int:
    try:
        return psutil.Process(pid).num_fds() if pid else 0
    except psutil.NoSuchProcess:
        return 0


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="offpilot-soak-"))
        self.cache_dir = self.tmp / "cache"
        self.log_path = self.tmp / "server.log"
        self.ids: list = []
        self.expect_error: dict = {}
        self.faults = {"worker_killed": 0, "cache_broken": 0, "bad_frames": 0, "model_restarted": 0}
        self.versions: dict[str, int] = {}
        self.outstanding: list = []
        self.samples: list[dict] = []
        self.fault_order: list[str] = []

    # ---- plumbing ------------------------------------------------------------------------------------
    async def start(self) -> None:
        env = {**os.environ, "OFFPILOT_CACHE_DIR": str(self.cache_dir)}
        if self.args.tracemalloc:
            env["PYTHONTRACEMALLOC"] = "1"
        self.log_file = open(self.log_path, "wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lsp_server", "serve", "--fake-engine", json.dumps(FAKE),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.log_file, env=env, cwd=str(REPO),
        )
        self.client = RawClient(proc)
        caps = {"general": {"positionEncodings": ["utf-16"]}, "textDocument": {"inlineCompletion": {}}}
        params = {"processId": os.getpid(), "rootUri": None, "capabilities": caps,
                  "initializationOptions": {"completion": {"debounceMs": 0}}}
        await self.client.request("initialize", params, timeout_s=120)  # slow to import under tracemalloc
        self.client.notify("initialized", {})
        if (await self.client.wait_ready(timeout_s=120))["state"] != "ready":
            raise RuntimeError("the model did not load")

    async def status(self) -> dict:
        return (await self.client.request("offpilot/status", {}, timeout_s=60))["result"]

    def request(self, method: str, params) -> object:
        msg_id = self.client.request_nowait(method, params)
        self.ids.append(msg_id)
        return msg_id

    async def drain(self, keep: int = 0) -> None:
        while len(self.outstanding) > keep:
            await self.client.wait_response(self.outstanding.pop(0), timeout_s=30)

    # ---- the run ---------------------------------------------------------------------------------------
    async def measure(self, label: str) -> dict:
        st = await self.status()
        memory = (await self.client.request("offpilot/memory", {}, timeout_s=300))["result"]
        sites = memory["tracemalloc"]
        sample = {"label": label, "server_rss_mb": rss_mb(self.client.proc.pid), "worker_rss_mb": rss_mb(st["workerPid"]),
                  "server_fds": fds(self.client.proc.pid), "worker_pid": st["workerPid"], "open_documents": st["openDocuments"],
                  "tracemalloc": sites, "handler_futures": memory.get("handlerFutures", 0), "scheduler": st.get("scheduler"), "state": st["state"]}
        self.samples.append(sample)
        return sample

    async def run(self) -> dict:
        a = self.args
        t_start = time.monotonic()
        await self.start()
        try:
            uris = [f"file:///soak/open{i}.py" for i in range(OPEN_DOCS)]
            texts: dict[str, str] = {}
            for uri in uris:
                self.open_doc(uri, texts)
            # Warm-up: every path once, so imports and first-use caches are in the baseline.
            for uri in uris:
                self.type_char(uri, texts)
                self.outstanding.append(self.request("textDocument/inlineCompletion", self.cursor(uri, texts)))
            await self.drain()
            base = await self.measure("baseline")
            requests_every = max(1, a.changes // max(1, a.requests))
            cycle_every = max(1, a.changes // max(1, a.cycles))
            requests = cycles = 0
            half = None
            for i in range(a.changes):
                uri = uris[i % OPEN_DOCS]
                self.type_char(uri, texts)
                if i % requests_every == 0 and requests < a.requests:
                    self.outstanding.append(self.request("textDocument/inlineCompletion", self.cursor(uri, texts)))
                    requests += 1
                    await self.drain(keep=WINDOW)
                if i % cycle_every == 0 and cycles < a.cycles:
                    tmp_uri = f"file:///soak/cycle{cycles}.py"
                    self.open_doc(tmp_uri, texts)
                    self.type_char(tmp_uri, texts)
                    self.outstanding.append(self.request("textDocument/inlineCompletion", self.cursor(tmp_uri, texts)))
                    self.client.notify("textDocument/didClose", {"textDocument": {"uri": tmp_uri}})
                    texts.pop(tmp_uri)
                    cycles += 1
                if a.chaos and i % a.fault_every == a.fault_every // 2:
                    await self.fault(uris[0], texts)
                if i % 500 == 499:
                    await self.drain()
                    await asyncio.sleep(0)
                if half is None and i >= a.changes // 2:
                    await self.drain()
                    half = await self.measure("half")
            await self.drain()
            for uri in uris:
                self.client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
            await asyncio.sleep(0.5)
            recovered = None
            if a.chaos:
                await self.restore_cache()
                recovered = await self.recovers()
            end = await self.measure("end")
            alive = self.client.proc.returncode is None
            await asyncio.sleep(0.3)
        finally:
            code = await self.client.close()
            self.log_file.close()
        return self.report(base, half or base, end, requests, cycles, alive, code, time.monotonic() - t_start, recovered)

    def open_doc(self, uri: str, texts: dict[str, str]) -> None:
        self.versions[uri] = 1
        texts[uri] = DOC
        self.client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": DOC}})

    def type_char(self, uri: str, texts: dict[str, str]) -> None:
        """Type at the end of the document's last non-empty line (a new line now and then)."""
        text = texts[uri]
        lines = text.split("\n")
        line = len(lines) - 2
        col = len(lines[line])
        if col > 60 or self.rng.random() < 0.03:
            typed = "\n    "
        else:
            typed = self.rng.choice("abcxyz +-*(),")
        self.versions[uri] += 1
        pos = {"line": line, "character": col}
        self.client.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": self.versions[uri]},
                                                      "contentChanges": [{"range": {"start": pos, "end": pos}, "text": typed}]})
        lines[line] += typed
        texts[uri] = "\n".join(lines)

    def cursor(self, uri: str, texts: dict[str, str]) -> dict:
        lines = texts[uri].split("\n")
        return inline_params(uri, len(lines) - 2, len(lines[-2]))

    # ---- chaos -----------------------------------------------------------------------------------------
    async def fault(self, uri: str, texts: dict[str, str]) -> None:
        if not self.fault_order:  # each kind once per round, in a random order
            self.fault_order = self.rng.sample(["worker", "cache", "frames"], 3)
        kind = self.fault_order.pop()
        st = await self.status()
        if kind == "worker" and (self.faults["worker_killed"] >= self.args.max_kills or st["state"] != "ready"):
            kind = "frames"  # a worker still restarting (or the kill budget spent): another fault instead
        if kind == "worker":
            os.kill(st["workerPid"], signal.SIGKILL)
            self.faults["worker_killed"] += 1
            await asyncio.sleep(0.05)
        elif kind == "cache":
            await self.break_cache()
        else:
            self.bad_frames()
        st = await self.status()
        if st["state"] == "disabled":  # the crash breaker tripped: the user's way out
            self.outstanding.append(self.request("workspace/executeCommand", {"command": "offpilot.restartModel", "arguments": []}))
            self.faults["model_restarted"] += 1
        # After every fault the server still answers a plain request.
        self.outstanding.append(self.request("textDocument/inlineCompletion", self.cursor(uri, texts)))
        await self.drain()

    async def settled(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            st = await self.status()
            if st["state"] in ("ready", "failed", "disabled") or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.1)

    async def recovers(self) -> bool:
        """After the last fault: the worker restarts (or offpilot.restartModel brings it back) and a fresh
        document gets a suggestion."""
        st = await self.settled(70)
        if st["state"] == "disabled":
            await self.client.request("workspace/executeCommand", {"command": "offpilot.restartModel", "arguments": []})
            st = await self.settled(30)
        uri = "file:///soak/after-faults.py"
        self.client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1,
                                                                     "text": "def add(a, b):\n    return \n"}})
        reply = await self.client.request("textDocument/inlineCompletion", inline_params(uri, 1, 11), timeout_s=30)
        self.client.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        return st["state"] == "ready" and bool(reply.get("result", {}).get("items"))

    async def break_cache(self) -> None:
        """Mode 0500 on the cache folder (a fault only when not root: root ignores mode bits), and the SQLite
        file overwritten with random bytes under the server's open connection (a fault for root too)."""
        self.faults["cache_broken"] += 1
        if self.cache_dir.is_dir():
            os.chmod(self.cache_dir, 0o500)
            db = self.cache_dir / "cache.db"
            if db.exists():
                with open(db, "r+b") as f:
                    f.write(self.rng.randbytes(4096))

    async def restore_cache(self) -> None:
        if self.cache_dir.is_dir():
            os.chmod(self.cache_dir, 0o700)

    def bad_frames(self) -> None:
        self.faults["bad_frames"] += 1
        c = self.client
        c.send_raw(frame(b"{not json"))  # -32700 or a logged drop, nothing to count
        c.send_raw(b"garbage without a header\r\n")
        bad_id = self.request("textDocument/inlineCompletion", {"textDocument": {"uri": 5}, "position": {"line": -1}})
        self.expect_error[bad_id] = -32602
        unknown = self.request("offpilot/noSuchMethod", {})
        self.expect_error[unknown] = -32601
        self.outstanding += [bad_id, unknown]

    # ---- the verdict ---------------------------------------------------------------------------------
    def report(self, base: dict, half: dict, end: dict, requests: int, cycles: int, alive: bool, code: int, seconds: float,
               recovered: bool | None) -> dict:
        a = self.args
        responses = self.client.responses
        missing = [i for i in self.ids if not responses.get(i)]
        duplicated = [i for i in self.ids if len(responses.get(i, [])) > 1]
        wrong = [i for i, want in self.expect_error.items() if responses.get(i) and responses[i][0].get("error", {}).get("code") != want]
        suggested = sum(1 for i in self.ids if responses.get(i) and (responses[i][0].get("result") or {}).get("items"))
        log_text = self.log_path.read_text(errors="replace")
        tracebacks = log_text.count("Traceback (most recent call last)")
        error_lines = sum(1 for line in log_text.splitlines() if " ERROR " in line)
        rss_bound = max(10.0, 50.0 * a.changes / 10_000)
        server_growth = end["server_rss_mb"] - base["server_rss_mb"]
        worker_growth = end["worker_rss_mb"] - base["worker_rss_mb"] if end["worker_pid"] == base["worker_pid"] else None
        grown_sites = []
        if end["tracemalloc"]:  # growth from the half to the end, by site
            grown_sites = [g for g in end["tracemalloc"]["grown"] if g["grew_kb"] > 1024]
        checks = {
            "every request answered once": not missing and not duplicated and not wrong,
            "the model's suggestions reached the client": suggested > 0,
            # Under --tracemalloc the traces themselves grow RSS (2,000 edits: +25 MB, of which 0.1 MB in Python
            # objects): the per-site growth is the check there.
            f"server RSS growth < {rss_bound:.0f} MB": a.tracemalloc or server_growth < rss_bound,
            f"worker RSS growth < {rss_bound:.0f} MB": worker_growth is None or worker_growth < rss_bound,
            "server fds at baseline ±5": abs(end["server_fds"] - base["server_fds"]) <= 5,
            "open documents 0 after closing all": end["open_documents"] == 0,
            "pygls's handler table back to ≤ 5 entries": end["handler_futures"] <= 5,
            "no top-10 allocation site grew > 1 MB over the second half": not grown_sites,
        }
        if a.chaos:
            checks["server alive through the faults"] = alive
            checks["the model back and suggesting after the faults"] = bool(recovered)
            checks["0 tracebacks in the server log"] = tracebacks == 0
        else:
            checks["clean exit (code 0)"] = code == 0
        return {
            "changes": a.changes, "inline_requests": requests, "open_close_cycles": cycles, "seconds": round(seconds, 1),
            "requests_sent": len(self.ids), "suggestions": suggested, "missing": len(missing), "duplicated": len(duplicated), "wrong_error": len(wrong),
            "server_rss_mb": [round(s["server_rss_mb"], 1) for s in (base, half, end)],
            "worker_rss_mb": [round(s["worker_rss_mb"], 1) for s in (base, half, end)],
            "server_rss_growth_mb": round(server_growth, 1),
            "worker_rss_growth_mb": None if worker_growth is None else round(worker_growth, 1),
            "server_fds": [s["server_fds"] for s in (base, half, end)],
            "open_documents_end": end["open_documents"], "handler_futures": [s["handler_futures"] for s in (base, half, end)],
            "scheduler_end": end["scheduler"],
            "tracemalloc_end": end["tracemalloc"], "tracemalloc_grown_sites": grown_sites,
            "faults": self.faults if a.chaos else None, "log_tracebacks": tracebacks, "log_error_lines": error_lines,
            "exit_code": code, "checks": checks, "ok": all(checks.values()), "log": str(self.log_path),
        }


def print_table(r: dict) -> None:
    print(f"soak: {r['changes']} didChange, {r['inline_requests']} inline, {r['open_close_cycles']} open/close, "
          f"{r['requests_sent']} requests in all ({r['suggestions']} answered with a suggestion), {r['seconds']} s")
    print(f"{'':24} {'baseline':>9} {'half':>9} {'end':>9}")
    print(f"{'server RSS (MB)':24} " + " ".join(f"{v:>9}" for v in r["server_rss_mb"]))
    print(f"{'worker RSS (MB)':24} " + " ".join(f"{v:>9}" for v in r["worker_rss_mb"]))
    print(f"{'server open fds':24} " + " ".join(f"{v:>9}" for v in r["server_fds"]))
    print(f"{'pygls handler table':24} " + " ".join(f"{v:>9}" for v in r["handler_futures"]))
    print(f"open documents at the end: {r['open_documents_end']}; missing {r['missing']}, duplicated {r['duplicated']}, "
          f"wrong error {r['wrong_error']}; log: {r['log_tracebacks']} tracebacks, {r['log_error_lines']} ERROR lines")
    if r["faults"]:
        print("faults: " + ", ".join(f"{k} {v}" for k, v in r["faults"].items()))
    if r["tracemalloc_end"]:
        print("top allocation sites at the end (KB):")
        for s in r["tracemalloc_end"]["top"]:
            print(f"  {s['kb']:>9}  {s['site']}")
        print("grown most over the second half (KB, blocks):")
        for s in r["tracemalloc_end"]["grown"]:
            print(f"  {s['grew_kb']:>9} {s['count_diff']:>7}  {s['site']}")
    for name, ok in r["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, default=10_000)
    p.add_argument("--requests", type=int, default=5_000)
    p.add_argument("--cycles", type=int, default=1_000, help="didOpen/didClose cycles")
    p.add_argument("--tracemalloc", action="store_true", help="run the server with PYTHONTRACEMALLOC=1 (slower)")
    p.add_argument("--chaos", action="store_true", help="random faults (see --fault-every)")
    p.add_argument("--fault-every", type=int, default=50, help="edits between two faults in a chaos run")
    p.add_argument("--max-kills", type=int, default=6, help="most worker SIGKILLs in a chaos run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (log, cache)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    result = asyncio.run(soak.run())
    if not args.keep and result["ok"]:
        shutil.rmtree(soak.tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
