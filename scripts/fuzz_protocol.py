#!/usr/bin/env python3
"""Long-run fuzzer over the server's stdio reader (lsp_server/framing.py) and dispatcher
(OffpilotProtocol.feed), in process, with the scripted model worker (reliability.md B6).

Each input is a byte stream: framed by the real FrameReader, fed to the real protocol of a real server
(its handlers, document store, completion and action services, a fake model worker subprocess), then the
event loop runs until every request in it is answered (the harness answers the server's own requests,
as an editor would). Reported per input:

- uncaught: an exception out of the reader or feed(), one the dispatcher's guard had to catch (a logged
  "failed to handle"), or one asyncio saw in a callback or task;
- slow: the input took more than 1 s to frame, dispatch and answer, on three runs of it (a single slow run
  is counted as slow_unconfirmed: on a shared machine a run can wait seconds for a core);
- wrong id: a response to an id the input never sent, more responses to an id than requests with it, or
  a request never answered.

Engines: atheris (coverage-guided, libFuzzer) when importable, else a seeded random loop. Inputs come
from a structure-aware generator (valid LSP messages from a seed table, with JSON values replaced by
hostile ones, keys dropped, ids retyped, bytes flipped, frames cut or mis-sized) and, for half of the
atheris inputs, the raw bytes as they are.

    .venv/bin/python scripts/fuzz_protocol.py --seconds 600
    .venv/bin/python scripts/fuzz_protocol.py --iterations 2000 --engine random --seed 1
Findings (the inputs) go under --out (default build/fuzz_protocol/); exit code 1 when there are any.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SLOW_S = 1.0

URIS = ["file:///w/a.py", "file:///w/b.js", "file:///w/c.txt", "file:///w/never-opened.py", "untitled:1"]
TEXTS = ["def add(a, b):\n    return \n", "x = '😀' + \"漢字\"\r\nif x:\n\tpass\n", "function f() {\n  return \n}\n",
         "", "\x00\ufffd\u202e\r\r\n\u2028", "a" * 3000]


def seed_messages(r) -> list[dict]:
    """One of each kind of message the server handles, with plausible params (before mutation)."""
    uri = r.pick(URIS)
    pos = {"line": r.int(4), "character": r.int(12)}
    rng = {"start": pos, "end": {"line": pos["line"] + r.int(2), "character": r.int(12)}}
    return [
        {"method": "textDocument/didOpen", "params": {"textDocument": {"uri": uri, "languageId": r.pick(["python", "javascript", "plaintext", "x"]),
                                                                      "version": r.int(5), "text": r.pick(TEXTS)}}},
        {"method": "textDocument/didChange", "params": {"textDocument": {"uri": uri, "version": r.int(50)},
                                                        "contentChanges": [{"range": rng, "text": r.pick(["", "x", "\n", "😀", "a\r\nb"])}]}},
        {"method": "textDocument/didChange", "params": {"textDocument": {"uri": uri, "version": r.int(50)}, "contentChanges": [{"text": r.pick(TEXTS)}]}},
        {"method": "textDocument/didClose", "params": {"textDocument": {"uri": uri}}},
        {"id": None, "method": "textDocument/inlineCompletion", "params": {"textDocument": {"uri": uri}, "position": pos, "context": {"triggerKind": r.pick([1, 2])}}},
        {"id": None, "method": "textDocument/completion", "params": {"textDocument": {"uri": uri}, "position": pos}},
        {"id": None, "method": "textDocument/codeAction", "params": {"textDocument": {"uri": uri}, "range": rng, "context": {"diagnostics": [
            {"range": rng, "message": "undefined name 'x'", "severity": 1}]}}},
        {"id": None, "method": "codeAction/resolve", "params": {"title": "Explain", "kind": "offpilot.explain", "data": {"uri": uri, "range": rng, "version": 1, "action": "explain"}}},
        {"id": None, "method": "workspace/executeCommand", "params": {"command": r.pick(["offpilot.explain", "offpilot.refactor", "offpilot.applyAction", "offpilot.restartModel", "nope"]),
                                                                     "arguments": [{"uri": uri, "range": rng, "goal": "x"}]}},
        {"method": "$/cancelRequest", "params": {"id": r.int(40)}},
        {"id": None, "method": "offpilot/status", "params": {}},
        {"id": None, "method": "offpilot/documentState", "params": {"uri": uri}},
        {"method": "workspace/didChangeConfiguration", "params": {"settings": {"offpilot": {"completion": {"enabled": r.pick([True, False, "x"]), "maxLines": r.pick([1, -1, "x"])}}}}},
        {"method": "window/workDoneProgress/cancel", "params": {"token": r.pick(["t", 1])}},
        {"id": None, "method": "shutdown"},
        {"method": "exit"},
        {"id": None, "method": "initialize", "params": {"processId": None, "capabilities": {}}},
        {"id": None, "method": "offpilot/unknown", "params": [1, 2]},
        {"id": "srv-1", "result": None},  # a response to a request the server never sent
    ]


HOSTILE = [None, True, -1, 0, 2**31, 2**63, -2**63, 1.5, float("1e308"), "", "x" * 5000, "\ud800", "\u202e", [], {}, [[[[[]]]]],
           {"uri": "file:///etc/passwd"}, "file:///etc/passwd", "../../x", 10**30]


class RandomChoices:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, n: int) -> int:
        return self.rng.randrange(max(1, n))

    def pick(self, seq):
        return seq[self.int(len(seq))]

    def prob(self) -> float:
        return self.rng.random()

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class ProviderChoices:
    """The same choices drawn from atheris's data, so coverage guides the structure too."""

    def __init__(self, fdp) -> None:
        self.fdp = fdp

    def int(self, n: int) -> int:
        return self.fdp.ConsumeIntInRange(0, max(1, n) - 1)

    def pick(self, seq):
        return seq[self.int(len(seq))]

    def prob(self) -> float:
        return self.fdp.ConsumeProbability()

    def bytes(self, n: int) -> bytes:
        return self.fdp.ConsumeBytes(n)


def _mutate_value(r, value, depth: int = 0):
    if isinstance(value, dict) and value and depth < 6 and r.prob() < 0.8:
        key = r.pick(sorted(value))
        out = dict(value)
        roll = r.prob()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[r.pick(["id", "jsonrpc", "method", "params", "extra", "textDocument"])] = r.pick(HOSTILE)
        else:
            out[key] = _mutate_value(r, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 6 and r.prob() < 0.7:
        out = list(value)
        i = r.int(len(out))
        out[i] = _mutate_value(r, out[i], depth + 1)
        if r.prob() < 0.1:
            out = out * (1 + r.int(50))
        return out
    return r.pick(HOSTILE)


def generate(r, next_id) -> bytes:
    """A stream of 1-8 frames from the seed table, mutated at the JSON, byte and framing levels."""
    out = bytearray()
    for _ in range(1 + r.int(8)):
        msg = dict(r.pick(seed_messages(r)))
        msg["jsonrpc"] = "2.0"
        if "id" in msg and msg["id"] is None:
            msg["id"] = next_id() if r.prob() < 0.9 else r.pick([1, "dup", 0, -5, "x" * 40])
        if r.prob() < 0.5:
            msg = _mutate_value(r, msg)
        try:
            body = json.dumps(msg, allow_nan=True).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError):
            body = b"{}"
        roll = r.prob()
        if roll < 0.1 and body:
            i = r.int(len(body))
            body = body[:i] + r.bytes(1 + r.int(8)) + body[i + 1:]
        elif roll < 0.15:
            body = body[: r.int(len(body) + 1)]
        roll = r.prob()
        if roll < 0.9:
            out += b"Content-Length: %d\r\n\r\n" % len(body) + body
        elif roll < 0.93:
            out += b"Content-Length: %d\r\n\r\n" % (len(body) + r.int(20) - 10) + body
        elif roll < 0.95:
            out += b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (r.int(99), len(body)) + body
        elif roll < 0.97:
            out += b"Content-Type: x\r\n\r\n" + body
        elif roll < 0.98:
            out += b"Content-Length: " + r.bytes(3) + b"\r\n\r\n" + body
        else:
            out += r.bytes(r.int(64))
    return bytes(out)


class _Capture:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    def close(self) -> None:
        pass


def _frames(buf: bytes) -> tuple[list[dict], int]:
    msgs, i = [], 0
    while True:
        end = buf.find(b"\r\n\r\n", i)
        if end < 0:
            return msgs, i
        length = next(int(h[16:]) for h in buf[i:end].split(b"\r\n") if h.startswith(b"Content-Length: "))
        if len(buf) < end + 4 + length:
            return msgs, i
        msgs.append(json.loads(buf[end + 4:end + 4 + length]))
        i = end + 4 + length


class Harness:
    def __init__(self, out_dir: Path) -> None:
        from lsp_server.server import create_server

        self.out_dir = out_dir
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(
            f"{ctx.get('message')}: {''.join(traceback.format_exception(ctx['exception'])) if ctx.get('exception') else ''}"))
        self.server = create_server(engine_overrides={"backend": "fake", "fake": {"outputs": ["a + b", "x\ny"], "token_delay_ms": 0}})
        self.errors: list[str] = []
        report = self.server.report_server_error

        def report_server_error(error, source) -> None:
            # Expected answers to bad input (unknown method, invalid params, cancelled) are JsonRpcExceptions
            # other than an internal error; anything else is a handler that raised.
            from pygls.exceptions import JsonRpcException, JsonRpcInternalError

            if isinstance(error, JsonRpcInternalError) or not isinstance(error, JsonRpcException):
                self.errors.append(f"{getattr(source, '__name__', source)}: {type(error).__name__}: {error}\n"
                                   + "".join(traceback.format_exception(error)))
            report(error, source)

        self.server.report_server_error = report_server_error

        async def no_stop() -> None:  # `shutdown` in an input must not take the model away from later inputs
            return None

        self.server.stop_engine = no_stop
        self.protocol = self.server.protocol
        self.capture = _Capture()
        self.protocol.set_writer(self.capture)
        self.exits: list[int] = []
        self.protocol.on_exit = self.exits.append
        self._ids = 0
        self.stats = {"inputs": 0, "frames": 0, "requests": 0, "responses": 0, "uncaught": 0, "slow": 0, "wrong_id": 0,
                      "oversize": 0, "max_input_s": 0.0}
        self.findings: list[dict] = []
        self._run(self._start())

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        init = {"jsonrpc": "2.0", "id": "init", "method": "initialize",
                "params": {"processId": None, "capabilities": {"textDocument": {"inlineCompletion": {}}}}}
        self.protocol.feed(json.dumps(init).encode())
        self.protocol.feed(b'{"jsonrpc": "2.0", "method": "initialized", "params": {}}')
        deadline = time.monotonic() + 30
        while self.server.engine.state != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake engine not ready: {self.server.engine.state} {self.server.engine.detail}")
            await asyncio.sleep(0.02)
        self.capture.buf.clear()

    async def _settle(self, deadline: float, replied: set) -> None:
        """Run the loop until nothing is open; answer the server's own requests like an editor."""
        parsed = 0
        while True:
            await asyncio.sleep(0)
            msgs, used = _frames(bytes(self.capture.buf[parsed:]))
            parsed += used
            for m in msgs:
                if "method" in m and "id" in m and m["id"] not in replied:
                    replied.add(m["id"])
                    n = len(m.get("params", {}).get("items", [])) if m["method"] == "workspace/configuration" else 0
                    result = [{}] * n if m["method"] == "workspace/configuration" else (
                        {"applied": True} if m["method"] == "workspace/applyEdit" else None)
                    self.protocol.feed(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}).encode())
            if not self.protocol.open_requests or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.002)

    def run_one(self, data: bytes) -> None:
        """Run an input; save it with its problems. An input that was only slow runs twice more and counts
        as slow if it is slow every time (on a shared machine one run can wait seconds for a core)."""
        self.stats["inputs"] += 1
        problems = self._attempt(data)
        if problems and all(p.startswith("slow") for p in problems):
            for _ in range(2):
                if not self._attempt(data):
                    self.stats["slow_unconfirmed"] = self.stats.get("slow_unconfirmed", 0) + 1
                    return
        if problems:
            kinds = {p.split(":", 1)[0].split(" (")[0] for p in problems}
            for kind in kinds:
                key = kind.replace(" ", "_")
                self.stats[key] = self.stats.get(key, 0) + 1
            self._save(data, problems)

    def _attempt(self, data: bytes) -> list[str]:
        from lsp_server.framing import FrameReader, FrameTooLarge
        from lsp_server.protocol import top_level_id

        self.protocol.shutdown_received = False
        self.protocol._shutdown = False
        self.capture.buf.clear()
        n_errors, n_loop, n_defects = len(self.errors), len(self.loop_errors), self.protocol.stats["defects"]
        sent: dict = {}
        problems: list[str] = []
        started = time.perf_counter()
        reader = FrameReader(io.BytesIO(data).read, on_drop=lambda why: None)
        try:
            while (body := reader.next_body()) is not None:
                self.stats["frames"] += 1
                try:
                    obj = json.loads(body)
                    msg_id = obj.get("id") if isinstance(obj, dict) and "method" in obj else None
                except (ValueError, RecursionError):
                    msg_id = top_level_id(body)
                if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool):
                    sent[msg_id] = sent.get(msg_id, 0) + 1
                self.protocol.feed(body)
        except FrameTooLarge:
            self.stats["oversize"] += 1  # the server logs and exits 1 here: the right end for this input
        except Exception:
            problems.append("uncaught: " + traceback.format_exc())
        replied: set = set()
        self._run(self._settle(time.monotonic() + SLOW_S, replied))
        elapsed = time.perf_counter() - started
        if self.protocol.open_requests:  # give a straggler time, so it cannot land on the next input
            self._run(self._settle(time.monotonic() + 5.0, replied))
        self.stats["max_input_s"] = max(self.stats["max_input_s"], elapsed)
        if elapsed > SLOW_S:
            problems.append(f"slow: {elapsed:.2f} s")
        msgs, _ = _frames(bytes(self.capture.buf))
        got: dict = {}
        for m in msgs:
            if "method" not in m:
                got[m.get("id")] = got.get(m.get("id"), 0) + 1
        self.stats["requests"] += sum(sent.values())
        self.stats["responses"] += sum(got.values())
        for msg_id, count in got.items():
            if msg_id is None or msg_id == "init":
                continue
            if msg_id not in sent or count > sent[msg_id]:
                problems.append(f"wrong id: {count} response(s) to {msg_id!r}, sent {sent.get(msg_id, 0)}")
        for msg_id in sent:
            if msg_id not in got and msg_id not in self.protocol.open_requests:
                # Dropped on purpose only when it reused the id of a request still running at the time.
                if self.protocol.stats["dropped"] == 0 or sent[msg_id] == 1:
                    problems.append(f"wrong id: request {msg_id!r} never answered")
        if self.protocol.open_requests:
            problems.append(f"wrong id: requests never answered: {sorted(map(str, self.protocol.open_requests))[:5]}")
            self.protocol.open_requests.clear()
        for err in self.errors[n_errors:]:
            problems.append("uncaught (handler): " + err)
        if self.protocol.stats["defects"] > n_defects:
            problems.append("uncaught (dispatcher guard): see the log with --log-level ERROR")
        for err in self.loop_errors[n_loop:]:
            problems.append("uncaught (event loop): " + err)
        self.protocol.stats["dropped"] = 0
        return problems

    def _save(self, data: bytes, problems: list[str]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = len(self.findings)
        if n < 200:
            (self.out_dir / f"finding-{n:03d}.bin").write_bytes(data)
            (self.out_dir / f"finding-{n:03d}.txt").write_text("\n\n".join(problems))
        self.findings.append({"problems": [p[:300] for p in problems]})
        print(f"finding {n}: {problems[0][:200]}", file=sys.stderr, flush=True)

    def report(self, engine: str, seconds: float) -> dict:
        s = dict(self.stats)
        s.update(engine=engine, seconds=round(seconds, 1), inputs_per_s=round(s["inputs"] / max(seconds, 1e-9), 1),
                 max_input_s=round(s["max_input_s"], 3), exit_notifications=len(self.exits),
                 suppressed_responses=self.protocol.stats["suppressed_responses"])
        return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long (default 60)")
    parser.add_argument("--iterations", type=int, default=0, help="stop after this many inputs (0: no limit)")
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "build" / "fuzz_protocol"))
    parser.add_argument("--log-level", default="CRITICAL", help="the server's log level while fuzzing (default: silent)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    for name in ("pygls", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    out_dir = Path(args.out)
    started = time.monotonic()
    if engine == "atheris":
        import atheris

        # Coverage of our code and pygls's dispatcher (instrumenting everything loaded costs minutes here).
        with atheris.instrument_imports(include=["lsp_server", "pygls"]):
            harness = Harness(out_dir)
    else:
        harness = Harness(out_dir)

    def done() -> bool:
        return time.monotonic() - started >= args.seconds or (args.iterations and harness.stats["inputs"] >= args.iterations)

    def finish() -> None:
        report = harness.report(engine, time.monotonic() - started)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2), flush=True)
        bad = report["uncaught"] + report["slow"] + report["wrong_id"]
        harness.server.engine.kill()
        os._exit(1 if bad else 0)

    if engine == "random":
        rng = random.Random(args.seed)
        choices = RandomChoices(rng)
        while not done():
            harness.run_one(generate(choices, harness.next_id))
        finish()

    def one_input(data: bytes) -> None:
        if done():
            finish()
        if data[:1] and data[0] & 1:
            harness.run_one(data[1:])  # raw bytes as they came
        else:
            harness.run_one(generate(ProviderChoices(atheris.FuzzedDataProvider(data[1:])), harness.next_id))

    corpus = out_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = RandomChoices(random.Random(args.seed))
    for i in range(20):
        (corpus / f"seed-{i:02d}").write_bytes(b"\x01" + generate(seeds, lambda: 1 + i))
    libfuzzer = [sys.argv[0], str(corpus), f"-max_total_time={int(args.seconds) + 30}", "-rss_limit_mb=4096",
                 f"-seed={args.seed or 1}", "-timeout=30", *rest]
    if args.iterations:
        libfuzzer.append(f"-runs={args.iterations + 20}")
    atheris.Setup(libfuzzer, one_input)
    atheris.Fuzz()
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
