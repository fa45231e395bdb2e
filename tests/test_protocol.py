"""Protocol robustness (reliability.md B1-B8): framing, malformed input, lifecycle, orphans, stdout purity,
quiet cancels, no notification flood, and a state machine over the real server process.

Servers are driven by `StrictServer`, which parses *every* byte of their stdout as LSP frames: one byte
that is not part of a well-formed frame fails the test that owns the server (B5 in every run).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from lsp_server.framing import MAX_HEADER_LINE, FrameReader, FrameTooLarge

REPO = Path(__file__).resolve().parent.parent
FAKE = {"outputs": ["a + b"], "token_delay_ms": 1}


def frame(msg) -> bytes:
    body = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def strict_frames(data: bytes) -> tuple[list[dict], bytes]:
    """Parse stdout strictly: (messages, bytes that are not part of a well-formed frame)."""
    messages, bad, i = [], bytearray(), 0
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            bad += data[i:]
            break
        headers = data[i:end].split(b"\r\n")
        length = None
        for h in headers:
            name, _, value = h.partition(b": ")
            if name == b"Content-Length" and value.isdigit():
                length = int(value)
            elif name != b"Content-Type":
                length = None
                break
        if length is None or end + 4 + length > len(data):
            bad += data[i:end + 4]
            i = end + 4
            continue
        body = data[end + 4:end + 4 + length]
        try:
            messages.append(json.loads(body))
        except ValueError:
            bad += body
        i = end + 4 + length
    return messages, bytes(bad)


class StrictServer:
    """The real server over stdio; every stdout byte kept and parsed strictly; replies by id."""

    def __init__(self, *args: str, fake: dict | None = FAKE, stdin=subprocess.PIPE, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "lsp_server", "serve", *args]
        if fake is not None:
            cmd += ["--fake-engine", json.dumps(fake)]
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.responses: dict[object, list[dict]] = defaultdict(list)
        self.notifications: list[dict] = []
        self.arrival: dict[object, float] = {}
        self.cond = threading.Condition()
        self._parsed = 0
        self._next_id = 1000
        self.sent_ids: list = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self.cond:
                if not chunk:
                    self.cond.notify_all()
                    return
                self.stdout += chunk
                self._parse()
                self.cond.notify_all()

    def _read_err(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self.stderr += chunk

    def _parse(self) -> None:
        while True:
            data = bytes(self.stdout[self._parsed:])
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return
            length = next((int(h[16:]) for h in data[:end].split(b"\r\n") if h.startswith(b"Content-Length: ")), None)
            if length is None or len(data) < end + 4 + length:
                return
            msg = json.loads(data[end + 4:end + 4 + length])
            self._parsed += end + 4 + length
            if "method" in msg and "id" in msg:  # a server-to-client request: answer null (or [{}] for config)
                result = [{}] * len(msg["params"]["items"]) if msg["method"] == "workspace/configuration" else None
                self.send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
            elif "method" in msg:
                self.notifications.append(msg)
            else:
                self.responses[msg.get("id")].append(msg)
                self.arrival.setdefault(msg.get("id"), time.monotonic())

    # ---- sending ------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, msg) -> None:
        try:
            self.write(frame(msg))
        except (BrokenPipeError, ValueError):
            pass

    def request_nowait(self, method: str, params=None, msg_id=None):
        if msg_id is None:
            msg_id = self._next_id
            self._next_id += 1
        self.sent_ids.append(msg_id)
        msg = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return msg_id

    def wait(self, msg_id, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not self.responses.get(msg_id):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.responses.get(msg_id)):
                    raise TimeoutError(f"no response to {msg_id!r}; stderr tail: {bytes(self.stderr[-2000:])!r}")
                self.cond.wait(min(left, 0.05))
            return self.responses[msg_id][0]

    def request(self, method: str, params=None, timeout_s: float = 10.0) -> dict:
        return self.wait(self.request_nowait(method, params), timeout_s)

    def notify(self, method: str, params=None) -> None:
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def initialize(self, **params) -> dict:
        base = {"processId": None, "rootUri": None,
                "capabilities": {"textDocument": {"inlineCompletion": {}}, "general": {"positionEncodings": ["utf-16"]}}}
        reply = self.request("initialize", {**base, **params}, timeout_s=30)
        self.notify("initialized", {})
        return reply

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.request("offpilot/status", {})["result"]
            if status["state"] in ("ready", "failed"):
                return status
            time.sleep(0.05)
        raise TimeoutError("model never ready")

    def exit_code(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def non_frame_bytes(self) -> bytes:
        with self.cond:
            return strict_frames(bytes(self.stdout))[1]

    def shown_messages(self) -> list[dict]:
        return [n for n in self.notifications if n["method"] in ("window/showMessage", "window/showMessageRequest")]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("shutdown", timeout_s=10)
                self.notify("exit")
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        # B5 in every run: nothing but frames on stdout.
        assert self.non_frame_bytes() == b"", bytes(self.stdout[:2000])


def gone_within(pids: list[int], timeout_s: float) -> float | None:
    """Seconds until none of `pids` runs (zombies count as gone), or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def inline(uri: str, line: int, character: int) -> dict:
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}, "context": {"triggerKind": 1}}


# ==== B2: framing, over the pure reader ==================================================================

def reader_over(data: bytes, **kw) -> tuple[FrameReader, list[int]]:
    pos = [0]
    asked: list[int] = []

    def read(n: int) -> bytes:
        asked.append(n)
        chunk = data[pos[0]:pos[0] + min(n, 4096)]
        pos[0] += len(chunk)
        return chunk

    return FrameReader(read, **kw), asked


def bodies(data: bytes) -> tuple[list[bytes], FrameReader]:
    reader, _ = reader_over(data)
    out = []
    while (body := reader.next_body()) is not None:
        out.append(body)
    return out, reader


GOOD = b'{"jsonrpc":"2.0","id":1,"method":"m"}'


@pytest.mark.parametrize("data, expected, dropped", [
    (frame(GOOD), [GOOD], 0),
    (b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" % len(GOOD) + GOOD, [GOOD], 0),
    (b"Content-Type: application/vscode-jsonrpc\r\nContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD, [GOOD], 0),
    (b"content-length:%d\n\n" % len(GOOD) + GOOD, [GOOD], 0),  # lenient on case, spaces and bare LF
    # repeated Content-Length: the last one wins (clangd's rule)
    (b"Content-Length: 999\r\nContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD, [GOOD], 0),
    # non-numeric, negative, missing: that header block is dropped, the next frame is still read
    (b"Content-Length: abc\r\n\r\n" + GOOD + frame(GOOD), [GOOD], 2),
    (b"Content-Length: -5\r\n\r\n" + frame(GOOD), [GOOD], 1),
    (b"Content-Type: text/plain\r\n\r\n" + GOOD + frame(GOOD), [GOOD], 2),
    (b"Content-Length: 0\r\n\r\n" + frame(GOOD), [b"", GOOD], 0),
    (b"garbage\r\n\r\n" + frame(GOOD) + b"\r\n" + frame(GOOD), [GOOD, GOOD], 1),
    (b"xyzContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD, [GOOD], 1),  # junk glued before a header
    # a truncated final frame: what came before is kept, then a clean end
    (frame(GOOD) + b"Content-Length: 100\r\n\r\n{\"jsonrpc\"", [GOOD], 0),
    (frame(GOOD) + b"Content-Len", [GOOD], 1),
])
def test_framing_table(data, expected, dropped):
    got, reader = bodies(data)
    assert got == expected
    assert reader.dropped == dropped


def test_truncated_final_frame_is_reported():
    _, reader = bodies(frame(GOOD) + b"Content-Length: 100\r\n\r\n{")
    assert reader.truncated_at_eof


@pytest.mark.parametrize("declared", [32 * 1024 * 1024 + 1, 2_000_000_000, 10**18, 10**30, 10**100])
def test_oversize_is_refused_before_reading_its_body(declared):
    data = b"Content-Length: %d\r\n\r\n" % declared + b"x" * 100
    reader, asked = reader_over(data)
    with pytest.raises(FrameTooLarge):
        reader.next_body()
    assert max(asked) <= 64 * 1024  # never asked for the declared size


def test_a_long_junk_line_is_not_kept_whole():
    junk = b"x" * (4 * 1024 * 1024)
    reader, _ = reader_over(junk + b"\r\n" + frame(GOOD))
    peak = 0
    real = reader._fill

    def fill(want=65536):
        nonlocal peak
        ok = real(want)
        peak = max(peak, len(reader._buf))
        return ok

    reader._fill = fill
    assert reader.next_body() == GOOD
    assert peak <= MAX_HEADER_LINE + 64 * 1024


# ==== B1, B3, B7: the dispatcher in-process (a fake transport, no subprocess) ===============================

class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        pass

    def messages(self) -> list[dict]:
        msgs, bad = strict_frames(bytes(self.out))
        assert bad == b""
        return msgs


@pytest.fixture
def proto():
    from lsp_server.server import create_server

    server = create_server(engine_overrides={"backend": "fake", "fake": {}})
    writer = _Writer()
    server.protocol.set_writer(writer)
    exits: list[int] = []
    server.protocol.on_exit = exits.append
    server.protocol.writer_ = writer
    server.protocol.exits = exits
    return server.protocol


def feed(p, msg) -> None:
    p.feed(msg if isinstance(msg, bytes) else json.dumps(msg).encode())


def replies(p) -> dict:
    out: dict = defaultdict(list)
    for m in p.writer_.messages():
        if "method" not in m:
            out[m.get("id")].append(m)
    return out


INIT = {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {"processId": None, "capabilities": {}}}


def req(msg_id, method, params=None) -> dict:
    m = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        m["params"] = params
    return m


BAD_PARAMS = [
    {"position": {"line": 0, "character": 0}, "context": {"triggerKind": 1}},  # missing textDocument
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": -1, "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 2**31, "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": "0", "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 1.5, "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": True, "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": 5}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 1}},
    {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 0}},
    {"textDocument": {"uri": "file:///a.py"}, "position": [0, 0], "context": {"triggerKind": 1}},
    None,
    [],
    "params",
]


async def test_every_malformed_request_gets_exactly_one_error_with_its_id(proto):
    feed(proto, INIT)
    expected = {}
    for i, params in enumerate(BAD_PARAMS):
        m = req(i, "textDocument/inlineCompletion")
        m["params"] = params
        feed(proto, m)
        expected[i] = -32602
    feed(proto, req("u", "offpilot/noSuchMethod", {}))
    expected["u"] = -32601
    feed(proto, b'{"jsonrpc": "2.0", "id": 77, "method": "offpilot/status", "params": {')  # not JSON, id readable
    expected[77] = -32700
    feed(proto, {"jsonrpc": "1.0", "id": "v1", "method": "offpilot/status"})
    expected["v1"] = -32600
    feed(proto, {"jsonrpc": "2.0", "id": "m", "method": 42})
    expected["m"] = -32600
    feed(proto, INIT | {"id": "again"})
    expected["again"] = -32600
    got = replies(proto)
    for msg_id, code in expected.items():
        assert [r["error"]["code"] for r in got[msg_id]] == [code], (msg_id, got[msg_id])
    assert replies(proto)["init"][0]["result"]["capabilities"]


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"\xff\xfe", b"[" * 100000, b"[]", b"42", b'"s"', b"null",
    b'{"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 5}',  # nested id: never taken as its id
    json.dumps({"jsonrpc": "2.0", "result": 1}).encode(),  # a response without id
    json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": 3}}).encode(),
    json.dumps({"jsonrpc": "2.0", "method": "offpilot/unknownNotification"}).encode(),
    # found by scripts/fuzz_protocol.py: unhashable ids and tokens reached pygls's dicts (TypeError)
    json.dumps({"jsonrpc": "2.0", "id": {"uri": "x"}, "result": None}).encode(),
    json.dumps({"jsonrpc": "2.0", "method": "window/workDoneProgress/cancel", "params": {"token": {"a": 1}}}).encode(),
    json.dumps({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": {"a": 1}}}).encode(),
])
async def test_undeliverable_input_is_dropped_and_the_next_request_answered(proto, body, caplog):
    feed(proto, INIT)
    feed(proto, body)
    feed(proto, req("next", "offpilot/documentState", {"uri": "file:///nothing"}))
    await asyncio.sleep(0.01)  # let a notification handler run
    assert proto.stats["defects"] == 0 and [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("pygls")] == []
    got = replies(proto)
    assert set(got) == {"init", "next"}, got
    assert got["next"] == [{"jsonrpc": "2.0", "id": "next", "result": None}]


@pytest.mark.parametrize("msg_id", [1.5, True, {"x": 1}, [1]])
async def test_a_request_id_of_the_wrong_type_gets_invalid_request_with_a_null_id(proto, msg_id):
    feed(proto, INIT)
    feed(proto, req(msg_id, "offpilot/status", {}))
    got = replies(proto)
    assert [r["error"]["code"] for r in got[None]] == [-32600]


@pytest.mark.parametrize("method", ["window/workDoneProgress/cancel", "$/cancelRequest", "exit", "initialized",
                                    "textDocument/didOpen"])
async def test_a_notification_sent_as_a_request_is_answered_not_run(proto, method):
    # Found by the fuzzer: pygls ran these as notifications and never answered (`exit` ended the process).
    feed(proto, INIT)
    feed(proto, req(5, method, {"token": 1, "id": 1}))
    assert [r["error"]["code"] for r in replies(proto)[5]] == [-32600]
    assert proto.exits == []


async def test_lifecycle_gates(proto):
    feed(proto, req(1, "offpilot/status", {}))
    feed(proto, {"jsonrpc": "2.0", "method": "textDocument/didOpen",
                 "params": {"textDocument": {"uri": "file:///a.py", "languageId": "python", "version": 1, "text": "x"}}})
    feed(proto, INIT)
    feed(proto, req(2, "offpilot/documentState", {"uri": "file:///a.py"}))
    got = replies(proto)
    assert got[1][0]["error"]["code"] == -32002
    assert got[2][0]["result"] is None  # the didOpen before initialize was dropped
    assert proto.exits == []
    feed(proto, {"jsonrpc": "2.0", "method": "exit"})
    assert proto.exits == [1]  # exit without shutdown: code 1


async def test_a_second_response_to_one_id_is_never_sent(proto):
    feed(proto, INIT)
    proto.open_requests.add(9)
    proto._send_response(9, result=1)
    proto._send_response(9, result=2)  # e.g. a handler finishing after its cancel was answered
    proto._send_response(10, result=3)  # an id the client never sent
    got = replies(proto)
    assert got[9] == [{"jsonrpc": "2.0", "id": 9, "result": 1}] and 10 not in got
    assert proto.stats["suppressed_responses"] == 2


async def test_cancel_of_unknown_or_finished_ids_is_quiet(proto, caplog):
    feed(proto, INIT)
    feed(proto, req(1, "offpilot/status", {}))
    caplog.clear()
    caplog.set_level("DEBUG")
    for msg_id in (1, 2, "x", None, [1]):
        feed(proto, {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": msg_id}})
    feed(proto, {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": 5})
    assert set(replies(proto)) == {"init", 1}
    assert [r.levelname for r in caplog.records if r.levelno >= 30] == []


# ==== e2e over stdio ======================================================================================

@pytest.fixture(scope="module")
def shared():
    """One server for the e2e tests that leave it running (start-up is most of an e2e test's time)."""
    server = StrictServer()
    server.initialize()
    assert server.wait_ready()["state"] == "ready"
    yield server
    server.close()  # asserts 0 non-frame bytes over all of them


def test_bad_input_e2e_each_request_answered_within_100_ms_and_the_next_served(shared):
    server = shared
    table = [("textDocument/inlineCompletion", p, -32602) for p in BAD_PARAMS] + [("offpilot/nope", {}, -32601)]
    latencies = []
    for method, params, code in table * 4:
        t0 = time.monotonic()
        msg_id = server.request_nowait(method, params)
        assert server.wait(msg_id, 5)["error"]["code"] == code
        latencies.append(server.arrival[msg_id] - t0)
    t0 = time.monotonic()
    server.write(frame(b'{"jsonrpc": "2.0", "id": "broken", "method": "x", '))
    server.sent_ids.append("broken")
    assert server.wait("broken", 5)["error"]["code"] == -32700
    latencies.append(server.arrival["broken"] - t0)
    server.write(frame(b"garbage that has no id"))
    assert server.request("offpilot/documentState", {"uri": "file:///x"})["result"] is None
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"B1: {len(latencies)} bad requests, each answered with its id: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert p99 < 0.100
    assert all(len(v) == 1 for v in server.responses.values()) and set(server.responses) == set(server.sent_ids)


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def test_oversize_frame_exits_1_within_1_s_without_allocating_it():
    server = StrictServer()
    server.initialize()
    assert server.wait_ready()["state"] == "ready"
    worker = server.request("offpilot/status", {})["result"]["workerPid"]
    time.sleep(0.2)
    before = _peak_rss(server.proc.pid)
    peak = before
    t0 = time.monotonic()
    server.write(b"Content-Length: 2147483648\r\n\r\n" + b"{" * 65536)
    code = None
    while time.monotonic() - t0 < 3:
        try:
            peak = max(peak, _peak_rss(server.proc.pid))
        except OSError:
            pass
        if (code := server.proc.poll()) is not None:
            break
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    print(f"B2: exit {code} in {elapsed:.2f} s, peak RSS +{(peak - before) / 1e6:.1f} MB")
    assert code == 1 and elapsed < 1.0
    assert peak - before < 10 * 1024 * 1024
    assert gone_within([worker], 1.0) is not None
    assert b"Content-Length 2147483648" in server.stderr and b"Traceback" not in server.stderr
    assert server.non_frame_bytes() == b""


def test_framing_errors_e2e_next_request_still_answered(shared):
    server = shared
    good = json.dumps({"jsonrpc": "2.0", "id": "after", "method": "offpilot/documentState", "params": {"uri": "file:///x"}}).encode()
    server.write(
        b"Content-Length: abc\r\n\r\n{\"jsonrpc\": \"2.0\", \"id\": \"lost\", \"method\": \"shutdown\"}"
        + b"Content-Type: application/json\r\n\r\n{}"
        + b"Content-Length: 999\r\nContent-Length: %d\r\n\r\n" % len(good) + good
    )
    server.sent_ids.append("after")
    assert server.wait("after", 5)["result"] is None
    assert "lost" not in server.responses  # the body of a frame with a bad header was not run


@pytest.mark.parametrize("after_shutdown", [False, True])
def test_end_of_input_inside_a_frame_is_a_clean_exit(after_shutdown):
    server = StrictServer()
    server.initialize()
    assert server.wait_ready()["state"] == "ready"
    worker = server.request("offpilot/status", {})["result"]["workerPid"]
    if after_shutdown:
        server.request("shutdown")
    t0 = time.monotonic()
    server.write(b"Content-Length: 500\r\n\r\n{\"jsonrpc\": ")
    server.proc.stdin.close()
    gone = gone_within([server.proc.pid, worker], 2.0)  # B4: stdin EOF → the server and its worker gone
    code = server.exit_code(3)
    elapsed = time.monotonic() - t0
    print(f"B2/B4: truncated frame then EOF → exit {code} in {elapsed:.2f} s, server and worker gone in {gone if gone is None else round(gone, 2)} s")
    assert code == (0 if after_shutdown else 1) and elapsed < 1.0
    assert gone is not None
    assert b"Traceback" not in server.stderr
    assert server.non_frame_bytes() == b""


def test_shutdown_and_end_of_input_in_one_write_exit_0():
    # The exit code is decided after the messages read before the end of input have run (it raced them).
    server = StrictServer()
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "capabilities": {}}}
    server.write(frame(init) + frame({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}))
    server.proc.stdin.close()
    assert server.exit_code(10) == 0
    assert server.non_frame_bytes() == b""


def test_lifecycle_e2e_exit_after_shutdown_code_0_and_workers_reaped():
    server = StrictServer()
    early = server.request_nowait("textDocument/inlineCompletion", inline("file:///a.py", 0, 0))
    assert server.wait(early)["error"]["code"] == -32002
    server.initialize()
    assert server.wait_ready()["state"] == "ready"
    worker = server.request("offpilot/status", {})["result"]["workerPid"]
    assert server.request("initialize", {"processId": None, "capabilities": {}})["error"]["code"] == -32600
    assert server.request("shutdown")["result"] is None
    for method, params in [("offpilot/status", {}), ("textDocument/inlineCompletion", inline("file:///a.py", 0, 0)), ("shutdown", None)]:
        assert server.request(method, params, timeout_s=2)["error"]["code"] == -32600
    t0 = time.monotonic()
    server.notify("exit")
    code = server.exit_code(3)
    elapsed = time.monotonic() - t0
    print(f"B3: exit after shutdown → code {code} in {elapsed:.2f} s")
    assert code == 0 and elapsed < 1.0
    assert gone_within([worker], 0.5) is not None
    assert server.non_frame_bytes() == b""


def test_lifecycle_e2e_exit_without_shutdown_code_1():
    server = StrictServer()
    server.initialize()
    assert server.wait_ready()["state"] == "ready"
    worker = server.request("offpilot/status", {})["result"]["workerPid"]
    server.request_nowait("textDocument/inlineCompletion", inline("file:///a.py", 0, 0))
    t0 = time.monotonic()
    server.notify("exit")
    code = server.exit_code(3)
    elapsed = time.monotonic() - t0
    print(f"B3: exit without shutdown → code {code} in {elapsed:.2f} s")
    assert code == 1 and elapsed < 1.0
    assert gone_within([worker], 0.5) is not None


# ---- B4: orphans ----------------------------------------------------------------------------------------

def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def test_stdout_closed_epipe_server_and_worker_gone_within_2_s():
    # No reader thread here: a read() in progress would keep the pipe's read end open after close().
    proc = subprocess.Popen([sys.executable, "-m", "lsp_server", "serve", "--fake-engine", "{}"], cwd=str(REPO),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "capabilities": {}}}
    proc.stdin.write(frame(init) + frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
    proc.stdin.flush()
    assert proc.stdout.read1(65536).startswith(b"Content-Length:")  # the initialize reply
    server = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    while not server.children():
        assert time.monotonic() < deadline, "no worker"
        time.sleep(0.05)
    worker = server.children()[0].pid
    time.sleep(0.3)
    proc.stdout.close()  # the client stops reading; its writes continue
    t0 = time.monotonic()
    proc.stdin.write(frame({"jsonrpc": "2.0", "id": 2, "method": "offpilot/status", "params": {}}))  # its reply meets EPIPE
    proc.stdin.flush()
    elapsed = gone_within([proc.pid, worker], 2.0)
    print(f"B4: EPIPE → server and worker gone in {elapsed:.2f} s" if elapsed is not None else "B4: EPIPE: still running")
    assert elapsed is not None
    assert proc.wait() == 1


INTERMEDIATE = textwrap.dedent("""
    import json, os, subprocess, sys, time
    fd = int(sys.argv[1])
    # The server's stdin is a pipe whose write end the test also holds: only the processId watchdog
    # can tell that this (the editor) died.
    server = subprocess.Popen([sys.executable, "-m", "lsp_server", "serve", "--fake-engine", "{}"],
                              stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fd,))
    print(server.pid, flush=True)
    time.sleep(600)
""")


def test_client_sigkilled_processid_watchdog_gone_within_2_s():
    r, w = os.pipe()
    inter = subprocess.Popen([sys.executable, "-c", INTERMEDIATE, str(r)], cwd=str(REPO), pass_fds=(r,),
                             stdout=subprocess.PIPE)
    os.close(r)
    try:
        server_pid = int(inter.stdout.readline())
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"processId": inter.pid, "capabilities": {}}}).encode()
        os.write(w, frame(body) + frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
        server = psutil.Process(server_pid)
        deadline = time.monotonic() + 30
        while not [c for c in server.children() if "lsp_server.engine.worker" in " ".join(c.cmdline())]:
            assert time.monotonic() < deadline, "no worker"
            time.sleep(0.05)
        worker = server.children()[0].pid
        for _ in range(40):  # let start-up finish (imports, the model load): the idle server is measured
            c0 = _cpu_s(server)
            time.sleep(0.25)
            if _cpu_s(server) - c0 < 0.005:
                break
        cpu0 = _cpu_s(server)
        t0 = time.monotonic()
        inter.send_signal(signal.SIGKILL)
        inter.wait()
        cpu1, last = cpu0, t0
        while time.monotonic() - t0 < 3:
            try:
                if server.status() == psutil.STATUS_ZOMBIE:
                    break
                cpu1, last = _cpu_s(server), time.monotonic()
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        left = gone_within([server_pid, worker], 3.0)
        elapsed = None if left is None else time.monotonic() - t0
        cpu_share = (cpu1 - cpu0) / max(last - t0, 1e-3)
        print(f"B4: client SIGKILLed → server and worker gone in {elapsed:.2f} s, server CPU meanwhile {cpu_share:.1%}")
        assert elapsed is not None and elapsed < 2.0
        assert cpu_share < 0.05
    finally:
        os.close(w)
        if inter.poll() is None:
            inter.kill()


# ---- B5: stdout purity while a model loads --------------------------------------------------------------

def test_stdout_pure_and_no_reply_lost_while_the_fake_model_loads_and_after_a_worker_crash():
    server = StrictServer(fake={"outputs": ["x"], "load_delay_ms": 800, "crash_on_generate": 134})
    try:
        server.initialize(capabilities={"textDocument": {"inlineCompletion": {}}, "window": {"workDoneProgress": True}})
        uri = "file:///p.py"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = \n"}})
        during = [server.request_nowait("textDocument/inlineCompletion", inline(uri, 0, 4)) for _ in range(5)]
        for msg_id in during:
            assert server.wait(msg_id, 5)["result"] == {"items": []}
        assert server.wait_ready()["state"] == "ready"
        crash = server.request("textDocument/inlineCompletion", inline(uri, 0, 4), timeout_s=10)
        assert crash["result"] == {"items": []}  # the worker exited (code 134) mid-request; answered anyway
        status = server.wait_ready(30)
        assert status["state"] == "ready" and status["workerPid"]
        os.kill(status["workerPid"], signal.SIGSEGV)  # a native crash: whatever it prints goes to stderr
        after = [server.request_nowait("offpilot/status", {}) for _ in range(20)]
        assert all("result" in server.wait(i, 10) for i in after)
    finally:
        server.close()  # asserts 0 non-frame bytes


def test_stdout_pure_while_the_tiny_gguf_loads_in_llama_cpp(tiny_gguf):
    pytest.importorskip("llama_cpp")
    server = StrictServer("--model", str(tiny_gguf), fake=None)
    try:
        server.initialize()
        uri = "file:///t.py"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    \n"}})
        # Requests while llama.cpp loads in the worker (whose fd 1 is our stderr, not our stdout).
        states, inline_during = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = server.request("offpilot/status", {})["result"]["state"]
            states.append(state)
            if state == "loading":
                inline_during.append(server.request_nowait("textDocument/inlineCompletion", inline(uri, 1, 4)))
            if state in ("ready", "failed"):
                break
        assert "loading" in states and inline_during
        for msg_id in inline_during:
            assert "items" in server.wait(msg_id, 30)["result"]  # empty, or a suggestion once loaded: answered
        status = server.wait_ready(60)
        assert status["state"] == "ready", status
        reply = server.request("textDocument/inlineCompletion", inline(uri, 1, 4), timeout_s=30)
        assert "result" in reply
        print(f"B5: {states.count('loading')} status and {len(inline_during)} inline requests answered while llama.cpp "
              f"loaded; {len(server.stdout)} stdout bytes, all frames")
    finally:
        server.close()  # asserts 0 non-frame bytes


# ---- B7, B8 e2e --------------------------------------------------------------------------------------------

def test_quiet_cancels_e2e(shared):
    server = shared
    err_before = len(server.stderr)
    done = server.request_nowait("offpilot/status", {})
    server.wait(done)
    for msg_id in (done, 123456, "nope"):
        server.notify("$/cancelRequest", {"id": msg_id})
    probe = server.request("offpilot/documentState", {"uri": "file:///x"})
    assert probe["result"] is None
    time.sleep(0.2)
    assert set(server.responses) == {*server.sent_ids}
    assert all(len(v) == 1 for v in server.responses.values())
    assert server.shown_messages() == []
    assert b"cancel" not in server.stderr[err_before:].lower()  # at most a DEBUG line (not shown at INFO)


def test_a_thousand_malformed_frames_no_notification_flood(shared):
    server = shared
    kinds = [
        b"{broken json",
        json.dumps({"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {"textDocument": 1}}).encode(),
        json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": None}).encode(),
        json.dumps([1, 2]).encode(),
        json.dumps({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "zz"}}).encode(),
        b"\xff\xfe\x00",
    ]
    before = len(server.stderr)
    server.write(b"".join(frame(kinds[i % len(kinds)]) for i in range(1000)))
    reply = server.request("offpilot/documentState", {"uri": "file:///x"}, timeout_s=10)
    assert reply["result"] is None
    time.sleep(0.3)
    log_lines = bytes(server.stderr[before:]).count(b"\n")
    print(f"B8: 1000 malformed frames → {len(server.shown_messages())} showMessage, {log_lines} log lines")
    assert len(server.shown_messages()) <= 1
    assert log_lines <= 20
    assert set(server.responses) == set(server.sent_ids)
