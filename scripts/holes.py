"""Shared parts of the hole benchmarks (scripts/bench_holes.py, scripts/eval_fim.py).

Holes are cut from real source code we did not write: finding that code on this machine, choosing
lines worth a hole (tree-sitter keeps comments and strings out), cutting the hole, a small stdio LSP
client that drives `python -m lsp_server serve`, an in-process llama-cpp-python model with the same
FIM template as the server, and small report helpers (percentiles, fixed-width tables).

scripts/ is not a package; the scripts import this module after putting their own folder on sys.path.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lsp_server import languages, prompts  # noqa: E402
from lsp_server.config import Settings  # noqa: E402

# Well-known pure-Python packages whose sources serve as "code we did not write" (those installed are used).
PYTHON_PACKAGES = (
    "pygls", "lsprotocol", "cattrs", "attr", "attrs", "diskcache", "jinja2", "_pytest", "pluggy",
    "click", "packaging", "iniconfig", "markupsafe",
)
MIN_CONTENT_CHARS = 8
MAX_LINE_CHARS = 200
MAX_FILE_BYTES = 300_000
SKIP_DIRS = {".git", ".hg", ".svn", "node_modules", ".venv", "venv", "__pycache__", "build", "dist", ".tox"}
_LINE_SPLIT = re.compile(r"(\r\n|\r|\n)")
_COMMENT_START = ("#", "//", "/*", "*", '"""', "'''")
# A "line" hole's cursor goes right after one of these (and before something that is not a space).
LINE_CUT_AFTER = " (=[,.:"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- source files -------------------------------------------------------------------------------------


class SourceFile:
    """A source file that is not a plain file on disk: a member of a zip archive, a rustdoc source page.

    Plain files are passed around as `Path`; both kinds go through `read_source` and `source_ext`.
    """

    def __init__(self, name: str, ext: str, read: Callable[[], str]) -> None:
        self.name = name
        self.ext = ext
        self._read = read

    def read_text(self) -> str:
        return self._read()

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"SourceFile({self.name!r})"


def _usable(text: str) -> bool:
    return "\x00" not in text and "\r" not in text.replace("\r\n", "")


def read_source(item: Path | SourceFile) -> str | None:
    """The file's text, or None when it is too big, not UTF-8, binary or has lone CR line ends."""
    try:
        if isinstance(item, SourceFile):
            text = item.read_text()
            if len(text.encode("utf-8")) > MAX_FILE_BYTES:
                return None
        else:
            if item.stat().st_size > MAX_FILE_BYTES:
                return None
            text = item.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile):
        return None
    return text if _usable(text) else None


def source_ext(item: Path | SourceFile, language: str) -> str:
    """The extension for the document's URI (the server goes by the languageId first); a file without one
    (a C++ standard header) gets the language's first."""
    if isinstance(item, SourceFile):
        return item.ext
    return item.suffix.lstrip(".") or language_info(language).extensions[0].lstrip(".")


def short_name(name: str) -> str:
    for marker in ("site-packages/", "node_modules/"):
        if marker in name:
            name = name.split(marker, 1)[1]
    return name


def language_for(path: Path) -> languages.LanguageInfo | None:
    suffix = path.suffix.lower()
    for info in languages.LANGUAGES:
        if suffix in info.extensions:
            return info
    return None


def language_info(name: str) -> languages.LanguageInfo:
    return next(i for i in languages.LANGUAGES if i.name == name)


def _walk_files(root: Path, keep: Callable[[Path], bool], skip: set[str] | frozenset[str] = SKIP_DIRS) -> list[Path]:
    """Files under `root` that `keep` accepts, in a stable order; hidden folders and `skip` not entered."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if keep(p) and p.is_file():
                files.append(p)
    return files


def default_python_files() -> tuple[list[Path], str]:
    roots = []
    for key in ("purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key])
        if p.is_dir() and p not in roots:
            roots.append(p)
    files: list[Path] = []
    used = []
    for root in roots:
        for pkg in PYTHON_PACKAGES:
            d = root / pkg
            if d.is_dir():
                used.append(pkg)
                files.extend(sorted(d.rglob("*.py")))
    return files, "site-packages: " + (", ".join(sorted(set(used))) or "none found")


def npm_global_root() -> tuple[Path | None, str]:
    try:
        out = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"npm not available ({exc})"
    root = out.stdout.strip()
    if out.returncode != 0 or not root or not Path(root).is_dir():
        return None, "`npm root -g` found no global node_modules"
    return Path(root), ""


def default_js_files() -> tuple[list[Path], str]:
    root, why = npm_global_root()
    if root is None:
        return [], f"{why}; JavaScript from npm skipped"
    lib = root / "npm" / "lib"
    if not lib.is_dir():
        return [], "npm's own sources not found (`npm root -g`); JavaScript from npm skipped"
    return sorted(lib.rglob("*.js")), f"npm: {lib}"


def default_ts_files() -> tuple[list[Path], str]:
    """TypeScript shipped inside globally installed node packages (.ts, .mts, .cts, .d.ts)."""
    root, why = npm_global_root()
    if root is None:
        return [], f"typescript: {why}"
    exts = language_info("typescript").extensions
    files = _walk_files(root, lambda p: p.suffix.lower() in exts, skip=frozenset())
    if not files:
        return [], f"typescript: no .ts files under {root}"
    return files, f"typescript: {len(files)} files under {root}"


def default_go_files() -> tuple[list[Path], str]:
    """The Go toolchain's own sources if there is one, else Go files shipped as documentation."""
    try:
        out = subprocess.run(["go", "env", "GOROOT"], capture_output=True, text=True, timeout=60)
        goroot = Path(out.stdout.strip()) / "src" if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        goroot = None
    if goroot is not None and goroot.is_dir():
        files = _walk_files(goroot, lambda p: p.suffix == ".go" and not p.name.endswith("_test.go")
                            and "testdata" not in p.parts)
        if files:
            return files, f"go: {len(files)} files of the Go toolchain ({goroot})"
    files = _walk_files(Path("/usr/share/doc"), lambda p: p.suffix == ".go")
    if files:
        dirs = sorted({str(p.parent) for p in files})
        return files, f"go: no Go toolchain; {len(files)} files shipped as documentation ({', '.join(dirs)})"
    return [], "go: no Go toolchain and no Go sources found"


def _rustdoc_source(path: Path, name: str) -> SourceFile:
    def read() -> str:
        page = path.read_text(encoding="utf-8")
        m = re.search(r'<pre class="rust"><code>(.*?)</code></pre>', page, re.S)
        if m is None:
            raise ValueError("no source in this rustdoc page")
        body = re.sub(r"<a href=#\d+ id=\d+ data-nosnippet>\d+</a>", "", m.group(1))  # line numbers
        return html.unescape(re.sub(r"<[^>]+>", "", body))

    return SourceFile(name, "rs", read)


def default_rust_files() -> tuple[list[Path | SourceFile], str]:
    """rustup's rust-src component; else the standard library's source pages of rustup's rust-docs."""
    toolchains = sorted(glob.glob(os.path.expanduser("~/.rustup/toolchains/*")),
                        key=lambda t: (not Path(t).name.startswith("stable"), t))
    for tc in toolchains:
        src = Path(tc) / "lib" / "rustlib" / "src"
        if src.is_dir():
            files = _walk_files(src, lambda p: p.suffix == ".rs" and "tests" not in p.parts)
            if files:
                return files, f"rust: {len(files)} files of rust-src ({src})"
    for tc in toolchains:
        html_src = Path(tc) / "share" / "doc" / "rust" / "html" / "src"
        if html_src.is_dir():
            pages = sorted(html_src.rglob("*.rs.html"))
            if pages:
                files: list[Path | SourceFile] = [
                    _rustdoc_source(p, "rustdoc:" + str(p.relative_to(html_src))[: -len(".html")]) for p in pages
                ]
                return files, (
                    f"rust: no rust-src; {len(files)} standard-library files taken from rust-docs' source pages "
                    f"({html_src})"
                )
    return [], "rust: neither rust-src nor rust-docs found under ~/.rustup"


def default_c_files() -> tuple[list[Path], str]:
    """C sources shipped with system packages: examples under /usr/share/doc and .c files in /usr/include."""
    exts = (".c",)
    files = _walk_files(Path("/usr/share/doc"), lambda p: p.suffix in exts)
    files += _walk_files(Path("/usr/include"), lambda p: p.suffix in exts and "c++" not in p.parts)
    if not files:
        return [], "c: no .c files under /usr/share/doc or /usr/include"
    return files, f"c: {len(files)} .c files under /usr/share/doc and /usr/include (headers not used)"


def default_cpp_files() -> tuple[list[Path], str]:
    """The C++ standard library's headers (libstdc++ under /usr/include/c++), plus any .cc/.cpp docs."""
    cxx = sorted(Path("/usr/include/c++").glob("*")) if Path("/usr/include/c++").is_dir() else []
    cxx = [d for d in cxx if d.is_dir() and not d.is_symlink()]
    files: list[Path] = []
    note = []
    if cxx:
        root = cxx[-1]
        files = _walk_files(root, lambda p: p.suffix in ("", ".h", ".tcc", ".hpp"))
        note.append(f"{len(files)} libstdc++ headers ({root})")
    more = _walk_files(Path("/usr/share/doc"), lambda p: p.suffix in (".cc", ".cpp", ".cxx"))
    if more:
        files += more
        note.append(f"{len(more)} under /usr/share/doc")
    if not files:
        return [], "cpp: no libstdc++ headers under /usr/include/c++"
    return files, "cpp: " + ", ".join(note)


def default_java_files() -> tuple[list[SourceFile], str]:
    """The JDK's own sources (lib/src.zip) of the first JDK under /usr/lib/jvm that has them."""
    candidates = sorted(glob.glob("/usr/lib/jvm/*/lib/src.zip") + glob.glob("/usr/lib/jvm/*/src.zip"))
    seen = set()
    for c in candidates:
        p = Path(c)
        if not p.is_file():
            continue  # a dangling link
        real = p.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            with zipfile.ZipFile(real) as z:
                names = sorted(n for n in z.namelist() if n.endswith(".java"))
        except (OSError, zipfile.BadZipFile):
            continue
        if not names:
            continue
        jdk = real.parent.parent.name if real.parent.name == "lib" else real.parent.name
        opened: dict[str, zipfile.ZipFile] = {}

        def member(name: str, zpath: Path = real, opened: dict = opened, jdk: str = jdk) -> SourceFile:
            def read() -> str:
                if "zip" not in opened:
                    opened["zip"] = zipfile.ZipFile(zpath)
                z = opened["zip"]
                if z.getinfo(name).file_size > MAX_FILE_BYTES:
                    raise ValueError("too big")
                return z.read(name).decode("utf-8")

            return SourceFile(f"{jdk}:{name}", "java", read)

        return [member(n) for n in names], f"java: {len(names)} files of the JDK's src.zip ({real})"
    return [], "java: no JDK src.zip under /usr/lib/jvm"


DEFAULT_SOURCES: dict[str, Callable[[], tuple[list, str]]] = {
    "python": default_python_files,
    "javascript": default_js_files,
    "typescript": default_ts_files,
    "go": default_go_files,
    "rust": default_rust_files,
    "c": default_c_files,
    "cpp": default_cpp_files,
    "java": default_java_files,
}


def source_dir_files(directory: str) -> list[Path]:
    return _walk_files(Path(directory), lambda p: language_for(p) is not None)


# ---- choosing and cutting holes -------------------------------------------------------------------------


@dataclass
class Hole:
    index: int
    language: str
    language_id: str
    path: str
    line: int
    """0-based line of the hole."""
    column: int
    """Cursor column in characters (code points) of the holed line."""
    kind: str
    """bench_holes: "block" (the cursor after the indentation, the whole line removed) or "line" (the
    cursor after some of the line's code, the rest removed). eval_fim: "single" or "multi"."""
    expected: str
    text: str
    """The document with the hole cut out."""
    ext: str

    @property
    def offset(self) -> int:
        pos = 0
        lines = _LINE_SPLIT.split(self.text)
        # lines alternates text, separator, text, ...
        for i in range(self.line):
            pos += len(lines[2 * i]) + len(lines[2 * i + 1])
        return pos + self.column

    @property
    def uri(self) -> str:
        """The real file's URI when it is a source file of its language (so the server finds its imports
        on disk, as in an editor), else a made-up one."""
        path = Path(self.path)
        info = languages.detect("", path.as_uri()) if path.is_absolute() else None
        if info is not None and info.name == self.language and path.is_file():
            return path.resolve().as_uri()
        return f"file:///bench/{self.index}.{self.ext}"

    @property
    def column_utf16(self) -> int:
        line = _LINE_SPLIT.split(self.text)[2 * self.line]
        return len(line[: self.column].encode("utf-16-le")) // 2


def line_parts(text: str) -> list[str]:
    """The text split into lines and line ends, alternating: line, end, line, end, ..., line."""
    return _LINE_SPLIT.split(text)


def split_lines(text: str) -> list[str]:
    return _LINE_SPLIT.split(text)[0::2]


def parse_tree(language: str, text: str):
    try:
        return languages.parse(language, text)
    except Exception:  # a grammar problem must not stop the benchmark; fall back to prefix rules
        return None


def eligible_lines(text: str, language: str, tree=None) -> list[int]:
    """Lines worth a hole: enough code after the indentation, not blank, not in a comment or string."""
    lines = split_lines(text)
    if tree is None:
        tree = parse_tree(language, text)
    root = tree.root_node if tree is not None else None
    out = []
    for i, line in enumerate(lines):
        if len(line) > MAX_LINE_CHARS:
            continue
        rest = line.lstrip(" \t")
        indent = len(line) - len(rest)
        if len(re.sub(r"\s", "", rest)) < MIN_CONTENT_CHARS:
            continue
        if rest.startswith(_COMMENT_START):
            continue
        if root is not None:
            node = root.named_descendant_for_point_range((i, indent), (i, indent))
            inside = False
            while node is not None:
                if "comment" in node.type or "string" in node.type:
                    inside = True
                    break
                node = node.parent
            if inside:
                continue
        out.append(i)
    return out


def line_cut_points(rest: str) -> list[int]:
    """Where a "line" hole's cursor may go in a line's code (indentation removed): after a separator."""
    return [i for i in range(3, len(rest) - 2) if rest[i - 1] in LINE_CUT_AFTER and not rest[i].isspace()]


@dataclass
class Cut:
    line: int
    column: int
    kind: str
    expected: str
    text: str


def cut_bench_hole(text: str, line_no: int, rng) -> Cut:
    """bench_holes: half "line" holes (after a separator, the rest removed), else a "block" hole."""
    parts = _LINE_SPLIT.split(text)
    line = parts[2 * line_no]
    rest = line.lstrip(" \t")
    indent = line[: len(line) - len(rest)]
    cut = 0
    if rng.random() < 0.5:  # half the holes start mid-line, after a separator
        cuts = line_cut_points(rest)
        cut = rng.choice(cuts) if cuts else 0
    parts[2 * line_no] = indent + rest[:cut]
    return Cut(line_no, len(indent) + cut, "line" if cut else "block", rest[cut:], "".join(parts))


def pick_holes(
    files: list,
    language: str,
    count: int,
    rng,
    start_index: int,
    *,
    candidates: Callable[[str, str], list] = eligible_lines,
    cut: Callable[[str, object, object], Cut | None] = cut_bench_hole,
) -> list[Hole]:
    """Up to `count` holes from random files: `candidates(text, language)` lists a file's possible holes
    (bench_holes: eligible lines), `cut(text, candidate, rng)` cuts one. Deterministic for a seeded rng."""
    info = language_info(language)
    pool = list(files)
    cache: dict = {}
    chosen: set = set()
    holes: list[Hole] = []
    attempts = 0
    while len(holes) < count and pool and attempts < count * 50:
        attempts += 1
        path = rng.choice(pool)
        if path not in cache:
            text = read_source(path)
            cache[path] = None if text is None else (text, candidates(text, language))
        entry = cache[path]
        if entry is None or not entry[1]:
            pool.remove(path)
            continue
        text, options = entry
        option = rng.choice(options)
        if (path, option) in chosen:
            continue
        chosen.add((path, option))
        c = cut(text, option, rng)
        if c is None:
            continue
        holes.append(
            Hole(
                index=start_index + len(holes),
                language=language,
                language_id=info.language_ids[0],
                path=str(path),
                line=c.line,
                column=c.column,
                kind=c.kind,
                expected=c.expected,
                text=c.text,
                ext=source_ext(path, language),
            )
        )
    return holes


# ---- a small LSP client over stdio ------------------------------------------------------------------------


class LspClient:
    def __init__(self, cmd: list[str], stderr, cwd: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd, env=env)
        self._forgotten: set[int] = set()
        self._lock = threading.Lock()
        self._next_id = 1
        self._events: dict[int, threading.Event] = {}
        self._replies: dict[int, tuple[dict, float]] = {}
        self.notifications: list[dict] = []
        self.stray_stdout = b""
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        out = self.proc.stdout
        assert out is not None
        try:
            while True:
                length = None
                while True:
                    header = out.readline()
                    if not header:
                        return
                    if header in (b"\r\n", b"\n"):
                        if length is not None:
                            break
                        continue
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":", 1)[1])
                    elif not header.lower().startswith(b"content-type:"):
                        self.stray_stdout += header
                body = out.read(length)
                arrived = time.perf_counter()
                if len(body) < length:
                    return
                self._dispatch(json.loads(body), arrived)
        finally:
            with self._lock:
                for ev in self._events.values():
                    ev.set()

    def _dispatch(self, msg: dict, arrived: float) -> None:
        if "method" in msg and "id" in msg:  # a request from the server
            method = msg["method"]
            result = [{}] * len(msg.get("params", {}).get("items", [])) if method == "workspace/configuration" else None
            self._write({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        elif "method" in msg:
            self.notifications.append(msg)
            if msg["method"] == "window/showMessage":
                log(f"server says: {msg.get('params', {}).get('message')}")
        elif "id" in msg:
            with self._lock:
                if msg["id"] in self._forgotten:
                    self._forgotten.discard(msg["id"])
                    return
                self._replies[msg["id"]] = (msg, arrived)
                ev = self._events.get(msg["id"])
            if ev is not None:
                ev.set()

    def _write(self, msg: dict) -> None:
        body = json.dumps(msg).encode("utf-8")
        data = b"Content-Length: %d\r\n\r\n" % len(body) + body
        with self._lock:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass  # the server is gone; the next request reports it

    def notify(self, method: str, params) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params, timeout_s: float) -> tuple[dict | None, float]:
        """(reply or None on timeout/exit, seconds from just before sending to the reply's arrival)."""
        ev = threading.Event()
        msg_id, sent, alive = self._send_request(method, params, ev)
        if alive:
            ev.wait(timeout_s)
        with self._lock:
            self._events.pop(msg_id, None)
            reply = self._replies.pop(msg_id, None)
        if reply is None:
            if self.proc.poll() is None:
                self.notify("$/cancelRequest", {"id": msg_id})
            return None, time.perf_counter() - sent
        return reply[0], reply[1] - sent

    def request_nowait(self, method: str, params) -> tuple[int, float]:
        """Send a request without waiting: (its id, the time just before sending); see peek_reply."""
        msg_id, sent, _ = self._send_request(method, params, None)
        return msg_id, sent

    def _send_request(self, method: str, params, event: threading.Event | None) -> tuple[int, float, bool]:
        """(id, time just before sending, whether the reader still runs); `event` is set when the reply comes."""
        with self._lock:
            msg_id = self._next_id
            self._next_id += 1
            if event is not None:
                self._events[msg_id] = event
        body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}).encode("utf-8")
        data = b"Content-Length: %d\r\n\r\n" % len(body) + body
        with self._lock:
            assert self.proc.stdin is not None
            sent = time.perf_counter()
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                alive = self._reader.is_alive()
            except (BrokenPipeError, OSError, ValueError):
                alive = False
        return msg_id, sent, alive

    def peek_reply(self, msg_id: int) -> tuple[dict, float] | None:
        """(reply, arrival time) once the reply to a request_nowait request is in, else None."""
        with self._lock:
            return self._replies.get(msg_id)

    def forget_reply(self, msg_id: int) -> None:
        with self._lock:
            if self._replies.pop(msg_id, None) is None:
                self._forgotten.add(msg_id)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.request("shutdown", None, 15)
                self.notify("exit", None)
                self.proc.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The server's line per generation, e.g. "completion ok lang=python mode=line tokens=620/7 reused=0
# finish=stop context=0.1ms prefill=8836ms decode=285ms [post=5.0ms] total=9122ms ...": read as key=value
# fields, so that fields added to the line later do not break it.
_COMPLETION_LOG = re.compile(r"\bcompletion (?P<state>ok|empty) (?P<fields>[^\n]*)")
_LOG_FIELD = re.compile(r"(\w+)=(\S+)")
_REASON_FIELD = re.compile(r"\breason=(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|\S+)")


def _ms_field(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value[:-2] if value.endswith("ms") else value)
    except ValueError:
        return None


def parse_completion_line(state: str, fields: str) -> dict | None:
    f = dict(_LOG_FIELD.findall(fields))
    tokens = f.get("tokens", "").split("/")
    try:
        prompt_tokens, generated = int(tokens[0]), int(tokens[1])
        reused = int(f["reused"])
    except (IndexError, KeyError, ValueError):
        return None
    timings = {k: _ms_field(f.get(k)) for k in ("prefill", "decode", "total")}
    if None in timings.values() or "mode" not in f or "finish" not in f:
        return None
    return {
        "state": state,
        "mode": f["mode"],
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "reused_tokens": reused,
        "finish": f["finish"],
        "prefill_ms": timings["prefill"],
        "decode_ms": timings["decode"],
        "server_total_ms": timings["total"],
    }


class LogTail:
    """New lines of the server's log since the last read (the server logs one line per generation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return ""
        self.pos += len(data)
        return data.decode("utf-8", errors="replace")

    def last_completion(self, data: str | None = None) -> dict | None:
        found = None
        for m in _COMPLETION_LOG.finditer(self.read() if data is None else data):
            found = parse_completion_line(m.group("state"), m.group("fields")) or found
        return found


def log_reasons(data: str) -> list[str]:
    """Every `reason=` field in these log lines (quotes removed)."""
    out = []
    for m in _REASON_FIELD.finditer(data):
        v = m.group(1)
        if v[:1] in "\"'" and v[-1:] == v[:1] and len(v) >= 2:
            v = v[1:-1]
        out.append(v)
    return out


# ---- the two paths --------------------------------------------------------------------------------------


@dataclass
class PathResult:
    ms: float | None = None
    text: str = ""
    nonempty: bool = False
    error: str = ""
    timeout: bool = False
    extra: dict = field(default_factory=dict)


def side_by_side(k: int, hole: Hole, lsp, other) -> tuple[PathResult, PathResult, bool]:
    """Complete one hole on both paths, one after the other, alternating which goes first (fairness)."""
    lsp_first = k % 2 == 0
    if lsp_first:
        r_lsp = lsp.complete(hole)
        r_other = other.complete(hole)
    else:
        r_other = other.complete(hole)
        r_lsp = lsp.complete(hole)
    return r_lsp, r_other, lsp_first


def hole_record(hole: Hole) -> dict:
    """The fields every per-hole record starts with."""
    return {
        "index": hole.index,
        "language": hole.language,
        "kind": hole.kind,
        "file": hole.path,
        "line": hole.line + 1,
        "column": hole.column,
        "expected": hole.expected,
    }


def workspace_folders(files_by_language: dict[str, list[Path]]) -> list[Path]:
    """One workspace folder per language: the folder its source files share (site-packages, npm's lib...)."""
    folders: list[Path] = []
    for files in files_by_language.values():
        real = [str(f.resolve()) for f in files if isinstance(f, Path) and f.is_file()]
        if real:
            common = Path(os.path.commonpath(real))
            folder = common if common.is_dir() else common.parent
            if folder not in folders:
                folders.append(folder)
    return folders


# One request per document: the response cache could only answer from an earlier run of the script, and a
# prefetch after each answer could only compete for the CPU with the other path's timed call. Both are off.
# First line first is off too: with one request per hole the answer would be a multi-line suggestion's first
# line only (in an editor the rest follows as that line is typed or accepted; the whole text is the same).
HOLE_BENCH_OPTIONS = {"cache": {"enabled": False}, "completion": {"prefetch": False, "firstLineFirst": False}}


def merge_options(base: dict, extra: dict) -> dict:
    """Server settings (initializationOptions) with `extra`'s sections merged over `base`'s."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


class LspPath:
    """The language server as an editor drives it: didOpen, inlineCompletion (timed), didClose.

    With `keep_log=True` each result's extra also holds the server's log lines written while the request
    ran (`log`) and any `reason=` fields in them (`reasons`)."""

    def __init__(self, model: Path, log_path: Path, timeout_s: float, client_name: str = "bench_holes",
                 keep_log: bool = False, workspace: Iterable[Path] = (), settings: dict | None = None) -> None:
        self.workspace = list(workspace)
        self.options = merge_options(HOLE_BENCH_OPTIONS, settings or {})
        self.timeout_s = timeout_s
        self.log_path = log_path
        self.client_name = client_name
        self.keep_log = keep_log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(log_path, "wb")
        cmd = [sys.executable, "-m", "lsp_server", "serve", "--model", str(model)]
        self.client = LspClient(cmd, self._stderr, str(REPO))
        self.tail = LogTail(log_path)
        self.status: dict = {}

    def start(self) -> None:
        caps = {
            "general": {"positionEncodings": ["utf-16"]},
            "textDocument": {
                "synchronization": {"dynamicRegistration": False},
                "inlineCompletion": {"dynamicRegistration": False},
            },
        }
        params = {
            "processId": os.getpid(),
            "clientInfo": {"name": self.client_name},
            "rootUri": self.workspace[0].as_uri() if self.workspace else None,
            "workspaceFolders": [{"uri": w.as_uri(), "name": w.name} for w in self.workspace] or None,
            "capabilities": caps,
            "initializationOptions": self.options,
        }
        reply, _ = self.client.request("initialize", params, 60)
        if reply is None or "error" in reply:
            raise RuntimeError(f"initialize failed: {reply}")
        self.client.notify("initialized", {})

    def wait_ready(self, load_timeout_s: float) -> dict:
        deadline = time.monotonic() + load_timeout_s
        while time.monotonic() < deadline:
            if self.client.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.client.proc.returncode}; see {self.log_path}")
            reply, _ = self.client.request("offpilot/status", {}, 30)
            status = (reply or {}).get("result") or {}
            if status.get("state") == "ready":
                self.status = status
                return status
            if status.get("state") == "failed":
                raise RuntimeError(f"the model failed to load: {status.get('detail')}; see {self.log_path}")
            time.sleep(0.2)
        raise RuntimeError(f"the model was not ready after {load_timeout_s:.0f} s; see {self.log_path}")

    def complete(self, hole: Hole) -> PathResult:
        res = PathResult()
        c = self.client
        uri = hole.uri
        if c.proc.poll() is not None:
            res.error = f"server exited with {c.proc.returncode}"
            return res
        c.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": hole.language_id, "version": 1, "text": hole.text}},
        )
        # A cheap round trip so that didOpen is handled before the timed request is sent.
        c.request("offpilot/status", {}, 30)
        self.tail.read()  # forget log lines of earlier requests
        params = {
            "textDocument": {"uri": uri},
            "position": {"line": hole.line, "character": hole.column_utf16},
            "context": {"triggerKind": 1},
        }
        try:
            reply, elapsed = c.request("textDocument/inlineCompletion", params, self.timeout_s)
        finally:
            c.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        res.ms = elapsed * 1000.0
        if reply is None:
            if c.proc.poll() is not None:
                res.error = f"server exited with {c.proc.returncode}"
            else:
                res.timeout = True
                res.error = f"no reply within {self.timeout_s:.0f} s"
            return res
        if "error" in reply:
            res.error = f"error reply: {reply['error']}"
            return res
        items = (reply.get("result") or {}).get("items") or []
        res.text = items[0].get("insertText", "") if items else ""
        if isinstance(res.text, dict):  # a StringValue snippet
            res.text = res.text.get("value", "")
        res.nonempty = bool(res.text.strip())
        if self.keep_log:
            data = self.tail.read()
            res.extra = self.tail.last_completion(data) or {}
            res.extra["log"] = [ln for ln in data.splitlines() if ln.strip()]
            res.extra["reasons"] = log_reasons(data)
        else:
            res.extra = self.tail.last_completion() or {}
        return res

    def close(self) -> None:
        self.client.close()
        self._stderr.close()


class LlamaModel:
    """The model in this process (llama-cpp-python) with the server's context length and threads, and the
    FIM template the server would pick for it (settings' model.family, else detected from the vocabulary)."""

    def __init__(self, model: Path, settings: Settings) -> None:
        from llama_cpp import Llama

        from lsp_server.hardware import plan_for_file

        self.settings = settings
        m = settings.model
        # the server's own hardware plan (context length, threads, KV type, GPU layers) for this model
        self.plan, _, _ = plan_for_file(model, n_ctx=m.n_ctx, n_gpu_layers=m.n_gpu_layers,
                                        vram_budget_mb=m.vram_budget_mb, n_threads=m.n_threads)
        self.n_threads = self.plan.n_threads
        self.llm = Llama(model_path=str(model), n_batch=512, verbose=False, **self.plan.llama_kwargs())
        self.template = self._detect_template()

    def _detect_template(self) -> prompts.FimTemplate:
        templates = prompts.load_templates()
        family = self.settings.model.family
        if family != "auto" and family in templates:
            return templates[family]
        present = []
        for tok in prompts.probe_tokens(templates.values()):
            raw = tok.encode("utf-8")
            special = self.llm.tokenize(raw, add_bos=False, special=True)
            if len(special) == 1 and special != self.llm.tokenize(raw, add_bos=False, special=False):
                present.append(tok)
        arch = str(self.llm.metadata.get("general.architecture", ""))
        found = prompts.detect_family(present, arch)
        if found is None:
            raise RuntimeError("the model has no known FIM tokens")
        return templates[found]

    def _tok_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def _tok_special(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []

    def bos(self) -> list[int]:
        return [self.llm.token_bos()] if self.template.add_bos and self.llm.token_bos() >= 0 else []

    def _perf_reset(self) -> None:
        try:
            from llama_cpp import llama_cpp as C

            C.llama_perf_context_reset(self.llm._ctx.ctx)
        except Exception:
            pass

    def _perf_read(self) -> dict:
        """llama.cpp's own counters for the last call: prompt evaluation and per-token decoding."""
        try:
            from llama_cpp import llama_cpp as C

            d = C.llama_perf_context(self.llm._ctx.ctx)
            return {
                "prompt_eval_ms": d.t_p_eval_ms,
                "prompt_eval_tokens": d.n_p_eval,
                "decode_eval_ms": d.t_eval_ms,
                "decode_eval_tokens": d.n_eval,
            }
        except Exception:
            return {}


# ---- report ------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


Column = tuple[str, int, str]
"""(title, width, align "<" or ">")."""


def table_lines(groups: list[list[Column]], rows: Iterable[list[str]]) -> list[str]:
    """A fixed-width table: columns in groups, " " between columns, " | " between groups; a header, a rule
    as long as the header, then one line per row (cells already formatted as strings)."""

    def line(cells: list[str]) -> str:
        it = iter(cells)
        out = []
        for group in groups:
            out.append(" ".join(
                next(it).ljust(width) if align == "<" else next(it).rjust(width) for _, width, align in group
            ))
        return " | ".join(out)

    header = line([title for group in groups for title, _, _ in group])
    return [header, "-" * len(header)] + [line(list(r)) for r in rows]
