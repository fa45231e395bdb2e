"""B6 in CI: a hypothesis state machine against the real server process (stdio, fake model worker).

Rules open, edit (incremental and full), complete, cancel and close documents and send bad frames, in
any order; after every step the server's copy of each open document (offpilot/documentState: version
and sha256) must equal a reference kept here, and at the end of each run every request id must have
exactly one response (errors with the expected code for the bad ones), stdout nothing but frames.
One server serves all runs (fresh URIs per run), so the budget goes to steps, not to start-ups.
OFFPILOT_SM_EXAMPLES scales the number of runs (default 50 runs: ~1,000 steps, 10-60 s on 2 shared cores depending on their load).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from test_protocol import StrictServer, frame, inline

EXAMPLES = int(os.environ.get("OFFPILOT_SM_EXAMPLES", "50"))
STEPS = 30
PIECES = list("ab \t(){}:=x") + ["\n", "\r\n", "\r", "é", "😀", "漢", "\u200d"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=24).map("".join)


def line_starts(text: str) -> list[int]:
    """Lines end at \\n, \\r\\n or \\r, as LSP says (nothing else: no \\f, \\v, U+2028)."""
    starts, i = [0], 0
    while i < len(text):
        if text[i] == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
            i += 2
            starts.append(i)
            continue
        if text[i] in "\r\n":
            starts.append(i + 1)
        i += 1
    return starts


def position(text: str, offset: int) -> dict:
    starts = line_starts(text)
    line = max(i for i, s in enumerate(starts) if s <= offset)
    units = sum(2 if ord(c) > 0xFFFF else 1 for c in text[starts[line]:offset])
    return {"line": line, "character": units}


def boundaries(text: str) -> list[int]:
    """Offsets an edit may start or end at: not inside a \\r\\n pair."""
    return [i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1] == "\r" and text[i] == "\n")]


class Totals:
    runs = 0
    steps = 0
    requests = 0


def make_machine(server: StrictServer, run_ids):
    class ProtocolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.run = next(run_ids)
            self.docs: dict[str, tuple[str, int]] = {}
            self.n_docs = 0
            self.expected: dict[object, int | None] = {}
            """Request id → expected error code (None: any result, or -32800 when cancelled)."""
            Totals.runs += 1

        def _step(self) -> None:
            Totals.steps += 1

        @precondition(lambda self: len(self.docs) < 3)
        @rule(text=TEXT)
        def open_doc(self, text):
            self._step()
            uri = f"file:///sm/{self.run}/{self.n_docs}.py"
            self.n_docs += 1
            server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})
            self.docs[uri] = (text, 1)

        @precondition(lambda self: self.docs)
        @rule(data=st.data(), new=TEXT)
        def edit(self, data, new):
            self._step()
            uri = data.draw(st.sampled_from(sorted(self.docs)))
            text, version = self.docs[uri]
            if data.draw(st.integers(0, 9)) == 0:
                change = {"text": new}
                after = new
            else:
                spots = boundaries(text)
                a, b = sorted((data.draw(st.sampled_from(spots)), data.draw(st.sampled_from(spots))))
                # An insert between \r and \n would join them into one line ending: keep edits off that seam.
                if (a > 0 and text[a - 1] == "\r" and new.startswith("\n")) or (b < len(text) and text[b] == "\n" and new.endswith("\r")):
                    new = new.strip("\r\n")
                change = {"range": {"start": position(text, a), "end": position(text, b)}, "text": new}
                after = text[:a] + new + text[b:]
            server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": version + 1}, "contentChanges": [change]})
            self.docs[uri] = (after, version + 1)

        @rule(data=st.data())
        def complete(self, data):
            self._step()
            uris = sorted(self.docs) + [f"file:///sm/{self.run}/never-opened.py"]
            uri = data.draw(st.sampled_from(uris))
            text = self.docs.get(uri, ("", 0))[0]
            at = position(text, data.draw(st.sampled_from(boundaries(text))))
            msg_id = server.request_nowait("textDocument/inlineCompletion", inline(uri, at["line"], at["character"]))
            self.expected[msg_id] = None

        @precondition(lambda self: self.expected)
        @rule(data=st.data())
        def cancel(self, data):
            self._step()
            target = data.draw(st.sampled_from(sorted(self.expected, key=str) + ["unknown-id", 10**9]))
            server.notify("$/cancelRequest", {"id": target})

        @precondition(lambda self: self.docs)
        @rule(data=st.data())
        def close(self, data):
            self._step()
            uri = data.draw(st.sampled_from(sorted(self.docs)))
            server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
            del self.docs[uri]

        @rule(kind=st.integers(0, 5), line=st.integers(-3, 2**33))
        def bad_frame(self, kind, line):
            self._step()
            if kind == 0:
                server.write(frame(b"{\"jsonrpc\": \"2.0\", \"method\": \"textDocument/didChange\", "))  # not JSON, no id
            elif kind == 1:
                msg_id = server.request_nowait("textDocument/inlineCompletion",
                                               {"textDocument": {"uri": "file:///x"}, "position": {"line": str(line), "character": 0}})
                self.expected[msg_id] = -32602
            elif kind == 2:
                msg_id = server.request_nowait("offpilot/noSuchMethod", {"line": line})
                self.expected[msg_id] = -32601
            elif kind == 3:
                server.write(b"Content-Length: x%d\r\n\r\n{\"jsonrpc\": \"2.0\"}" % line)  # bad header: dropped, next frame found
            elif kind == 4:
                server.notify("textDocument/didChange", {"textDocument": {"uri": 5}, "contentChanges": "no"})
            else:
                msg_id = server.request_nowait("textDocument/codeAction", {"textDocument": {"uri": "file:///x"}, "range": line})
                self.expected[msg_id] = -32602

        @invariant()
        def documents_match(self):
            for uri, (text, version) in self.docs.items():
                state = server.request("offpilot/documentState", {"uri": uri}, timeout_s=10)["result"]
                assert state is not None, uri
                assert (state["version"], state["desynced"]) == (version, False), (uri, state)
                assert state["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest(), (uri, repr(text))

        def teardown(self) -> None:
            for uri in list(self.docs):
                server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
            for msg_id, code in self.expected.items():
                reply = server.wait(msg_id, timeout_s=10)
                if code is None:
                    assert "result" in reply or reply["error"]["code"] == -32800, reply
                else:
                    assert reply["error"]["code"] == code, reply
            Totals.requests += len(self.expected)

    return ProtocolMachine


def test_protocol_state_machine_every_id_answered_once_and_documents_match():
    server = StrictServer(fake={"outputs": ["a + b", "x\ny"], "token_delay_ms": 1})
    started = time.monotonic()
    try:
        server.initialize()
        assert server.wait_ready()["state"] == "ready"
        machine = make_machine(server, itertools.count())
        run_state_machine_as_test(machine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck)))
        time.sleep(0.2)  # a duplicate would have arrived by now
        with server.cond:
            counts = {i: len(r) for i, r in server.responses.items()}
        assert set(counts) == set(server.sent_ids)  # no reply to an id never sent, none missing
        assert set(counts.values()) == {1}
        assert server.request("offpilot/status", {})["result"]["openDocuments"] == 0
        print(f"B6: {Totals.runs} state-machine runs, {Totals.steps} steps, {Totals.requests} checked requests, "
              f"{len(server.sent_ids)} ids all answered once, in {time.monotonic() - started:.1f} s")
    finally:
        server.close()  # asserts 0 non-frame bytes on stdout
