"""Loaded by every Python process the tests start (tests/conftest.py puts this folder first on PYTHONPATH):
the language server, its model worker, helper scripts.

OFFPILOT_BLOCK_NETWORK=1: connect() or sendto() to anything but loopback raises PermissionError (F12), so
a test that needed the network fails loudly instead of passing on a connected machine.

OFFPILOT_AUDIT_LOG=PATH: a spy for the security tests, one JSON line per event:
  {"ev": "start"}                      this process started with the guard (pid, argv);
  {"ev": "exec", ...}                  a process start (subprocess.Popen, os.system, os.exec*, os.spawn*,
                                       os.posix_spawn), with what it ran (F3);
  {"ev": "open", "path": ...}          an open() of a path under one of OFFPILOT_AUDIT_OPEN_PREFIXES (F11);
  {"ev": "net", "address": ...}        a blocked connection;
  {"ev": "render", "source": ...}      a Jinja template rendered, when OFFPILOT_AUDIT_JINJA=1 (F4).
Audit hooks (PEP 578) see these below any Python-level wrapper, and cannot be removed once installed.
"""

from __future__ import annotations

import json
import os
import sys
import threading

_state = threading.local()
_installed = False
enabled = True
"""The test process turns the network block on and off per test (conftest); subprocesses keep it on."""


def _log(event: dict) -> None:
    path = os.environ.get("OFFPILOT_AUDIT_LOG")
    if not path or getattr(_state, "busy", False):
        return
    _state.busy = True
    try:
        event = {"pid": os.getpid(), **event}
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(event, default=str) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass
    finally:
        _state.busy = False


def _is_loopback(host) -> bool:
    import ipaddress

    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_EXEC_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.startfile", "pty.spawn"}


def _hook(event: str, args) -> None:
    if getattr(_state, "busy", False):
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg") and enabled and os.environ.get("OFFPILOT_BLOCK_NETWORK") == "1":
        sock, address = args[0], args[1] if len(args) > 1 else None
        import socket

        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not _is_loopback(address[0]):
                _log({"ev": "net", "address": list(address[:2])})
                raise PermissionError(f"offpilot tests: outbound network is blocked ({address[0]}:{address[1]})")
    elif event in _EXEC_EVENTS:
        _log({"ev": "exec", "event": event, "args": [str(a)[:300] for a in args[:2]]})
    elif event == "open" and os.environ.get("OFFPILOT_AUDIT_OPEN_PREFIXES"):
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.fsdecode(path)
            if any(path.startswith(p) for p in os.environ["OFFPILOT_AUDIT_OPEN_PREFIXES"].split(os.pathsep) if p):
                _log({"ev": "open", "path": path})


def _spy_jinja() -> None:
    """Record every Jinja render in this process (llama-cpp-python renders a GGUF's chat template with it)."""
    try:
        import jinja2
    except ImportError:
        return
    template = jinja2.environment.Template
    for name in ("render", "render_async", "generate", "generate_async", "stream"):
        original = getattr(template, name, None)
        if original is None:
            continue

        def spy(self, *a, __original=original, __name=name, **kw):
            _log({"ev": "render", "method": __name, "source": getattr(self, "name", None)})
            return __original(self, *a, **kw)

        setattr(template, name, spy)


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    sys.addaudithook(_hook)
    if os.environ.get("OFFPILOT_AUDIT_JINJA") == "1":
        _spy_jinja()
    _log({"ev": "start", "argv": sys.argv[:4] if hasattr(sys, "argv") else [], "orig_argv": list(getattr(sys, "orig_argv", []))[:6]})


if os.environ.get("OFFPILOT_BLOCK_NETWORK") == "1" or os.environ.get("OFFPILOT_AUDIT_LOG"):
    install()
