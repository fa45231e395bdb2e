from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A ~250 KB random-weight Qwen2-shaped GGUF with the FIM tokens: every llama.cpp path, nonsense output."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The installed small default model (scripts/setup installs it); skipped when absent outside CI."""
    from lsp_server.models import ModelInstallError, resolve_model

    try:
        return resolve_model("qwen2.5-coder-0.5b")
    except ModelInstallError as exc:
        if os.environ.get("OFFPILOT_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"the real model is required here: {exc}")
        pytest.skip(f"real model not installed: {exc}")


@pytest.fixture(autouse=True)
def private_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Each test (and each server it starts) gets its own response cache folder: no test sees another's
    answers, and none touches the user's cache."""
    folder = tmp_path_factory.mktemp("cache") / "completions"
    monkeypatch.setenv("OFFPILOT_CACHE_DIR", str(folder))
    return folder


# ---- F12: no outbound network, in this process and in every Python process a test starts -------------
NETGUARD = Path(__file__).resolve().parent / "netguard"
sys.path.insert(0, str(NETGUARD.parent))
from netguard import sitecustomize as _netguard  # noqa: E402

os.environ["OFFPILOT_BLOCK_NETWORK"] = "1"
_netguard.install()


@pytest.fixture(autouse=True)
def no_outbound_network(monkeypatch):
    """connect()/sendto() to anything but loopback raises PermissionError here (an audit hook) and in the
    servers and model workers the test starts (tests/netguard/sitecustomize.py on their PYTHONPATH).
    Loopback stays open: the VS Code client test talks to code-server on 127.0.0.1."""
    monkeypatch.setenv("OFFPILOT_BLOCK_NETWORK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NETGUARD), *filter(None, [os.environ.get("PYTHONPATH")])]))
    _netguard.enabled = True
    yield


# ---- F1: no inet socket in any language server a test started, checked at the end of every test -------------
def _server_sockets() -> dict:
    """inet sockets LISTENing or ESTABLISHED in this process's live descendants that run lsp_server (servers and
    model workers), except servers started with --tcp on purpose. Browsers and code-server are not checked."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
            if not any("lsp_server" in part for part in cmdline) or "--tcp" in cmdline:
                continue
            conns = [c for c in child.net_connections(kind="inet") if c.status in (psutil.CONN_LISTEN, psutil.CONN_ESTABLISHED)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if conns:
            found[child.pid] = [f"{c.status} {c.laddr}" for c in conns]
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Before fixtures tear the servers down: the stdio servers and their workers hold no inet socket."""
    result = yield
    sockets = _server_sockets()
    assert not sockets, f"F1: a language server or model worker holds inet sockets: {sockets}"
    return result
