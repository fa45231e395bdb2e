"""A raw JSON-RPC client over the server's stdio, for tests that must see every byte and every id.

pytest-lsp's typed client cannot send malformed params, and it hides how many responses an id got;
this one records every message with its arrival time, and checks stdout carries frames only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class RawClient:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.responses: dict[object, list[dict]] = defaultdict(list)
        self.response_times: dict[object, float] = {}
        self.notifications: list[dict] = []
        self.server_requests: list[dict] = []
        self.replies: dict[str, object] = {}
        """Results for server-to-client requests by method (default null), e.g. workspace/applyEdit."""
        self.non_frame_bytes = b""
        self._next_id = 1
        self.sent_ids: list = []
        self._waiters: dict[object, asyncio.Future] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict | None = None) -> "RawClient":
        full_env = {**os.environ, **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lsp_server", "serve", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            env=full_env, cwd=str(REPO),
        )
        return cls(proc)

    async def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            line = await out.readline()
            if not line:
                return
            if not line.startswith(b"Content-Length:"):
                self.non_frame_bytes += line
                continue
            length = int(line.split(b":")[1])
            while True:  # other headers, then the blank line
                header = await out.readline()
                if header in (b"\r\n", b""):
                    break
            body = await out.readexactly(length)
            self._dispatch(json.loads(body))

    def _dispatch(self, msg: dict) -> None:
        if "method" in msg and "id" in msg:
            self.server_requests.append(msg)
            result = [{}] * len(msg["params"]["items"]) if msg["method"] == "workspace/configuration" else self.replies.get(msg["method"])
            self._write({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        elif "method" in msg:
            self.notifications.append(msg)
        else:
            msg_id = msg.get("id")
            self.responses[msg_id].append(msg)
            self.response_times.setdefault(msg_id, time.monotonic())
            waiter = self._waiters.pop(msg_id, None)
            if waiter and not waiter.done():
                waiter.set_result(msg)

    def _write(self, msg: dict) -> None:
        body = json.dumps(msg).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def request_nowait(self, method: str, params, msg_id=None):
        if msg_id is None:
            msg_id = self._next_id
            self._next_id += 1
        self._waiters[msg_id] = asyncio.get_running_loop().create_future()
        self.sent_ids.append(msg_id)
        self._write({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id

    async def wait_response(self, msg_id, timeout_s: float = 10.0) -> dict:
        if self.responses.get(msg_id):
            return self.responses[msg_id][0]
        fut = self._waiters.get(msg_id) or asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        return await asyncio.wait_for(fut, timeout_s)

    async def request(self, method: str, params, timeout_s: float = 10.0) -> dict:
        msg_id = self.request_nowait(method, params)
        return await self.wait_response(msg_id, timeout_s)

    def notify(self, method: str, params) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    async def initialize(self, capabilities: dict | None = None, options: dict | None = None) -> dict:
        caps = capabilities if capabilities is not None else {
            "general": {"positionEncodings": ["utf-16"]},
            "textDocument": {"inlineCompletion": {}},
            "window": {"workDoneProgress": True},
        }
        params = {"processId": os.getpid(), "rootUri": None, "capabilities": caps}
        if options is not None:
            params["initializationOptions"] = options
        reply = await self.request("initialize", params)
        self.notify("initialized", {})
        return reply

    async def wait_ready(self, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = (await self.request("offpilot/status", {}))["result"]
            if status["state"] in ("ready", "failed"):
                return status
            await asyncio.sleep(0.05)
        raise TimeoutError("model did not become ready")

    async def close(self) -> int:
        try:
            if self.proc.returncode is None:
                await self.request("shutdown", None, timeout_s=10)
                self.notify("exit", None)
                await asyncio.wait_for(self.proc.wait(), 10)
        except (asyncio.TimeoutError, ConnectionError, BrokenPipeError):
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        return self.proc.returncode or 0


def inline_params(uri: str, line: int, character: int, trigger: int = 2) -> dict:
    return {
        "textDocument": {"uri": uri},
        "position": {"line": line, "character": character},
        "context": {"triggerKind": trigger},
    }
