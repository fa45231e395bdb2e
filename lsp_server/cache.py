"""The response cache: the model's text for an exact prompt, in memory (LRU) and on disk (diskcache).

With greedy sampling the model's output is a function of the model file, the template and the prompt,
so the key is a hash over exactly those (plus the generation parameters) and a hit skips the model; the
post-processing still runs against the document as it is now. Only the raw model text is stored, as
JSON text: diskcache unpickles rows of its pickle mode (CVE-2025-69872), so the disk layer here refuses
every row that is not plain inline text. The folder is private (0700, files 0600); a database that
cannot be opened or read is deleted and rebuilt with one warning; a folder that cannot be written to
turns the disk layer off with one warning, and the memory layer keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("offpilot.cache")

MAX_VALUE_CHARS = 64 * 1024
"""A model answer is at most a few KB; anything bigger is not stored (and would not be read back)."""


def default_directory() -> Path:
    base = os.environ.get("OFFPILOT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "offpilot", "completions"
    )
    return Path(base)


def model_fingerprint(path: str | os.PathLike) -> str:
    """Identifies a model file's content: its sha256 when `models install` left one beside it, else a hash
    over the size and the first and last MiB (hashing a 5 GB file on every start would cost seconds)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    try:
        digest = sidecar.read_text(encoding="ascii").split()[0]
        if len(digest) == 64:
            return f"sha256:{digest}"
    except (OSError, IndexError, UnicodeDecodeError):
        pass
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    except OSError:
        return f"unreadable:{path}"
    return f"ends:{h.hexdigest()}"


def cache_key(parts: dict) -> str:
    """sha256 over the canonical JSON of everything the model's answer depends on."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _safe_disk_class():
    import diskcache
    from diskcache.core import MODE_RAW

    class TextOnlyDisk(diskcache.Disk):
        """Stores str values inline and reads back nothing else (no pickle, no files named by the database)."""

        def store(self, value, read, key=diskcache.core.UNKNOWN):
            if type(value) is not str or len(value) > MAX_VALUE_CHARS:
                raise ValueError("the completion cache stores short text only")
            return 0, MODE_RAW, None, value

        def fetch(self, mode, filename, value, read):
            if mode != MODE_RAW or type(value) is not str:
                raise ValueError(f"refusing a cache row of mode {mode}")
            return value

    return TextOnlyDisk


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stores: int = 0


class CompletionCache:
    def __init__(self, *, memory_entries: int = 512, directory: Path | None = None, disk_limit_mb: int = 64) -> None:
        self.memory_entries = max(0, memory_entries)
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.directory = directory
        self.disk_limit_mb = disk_limit_mb
        self._disk = None
        self.disk_error = ""
        self.stats = CacheStats()
        self.last_layer = ""
        """Where the last hit came from: "memory" or "disk"."""
        if directory is not None:
            self._open_disk()

    # ---- disk ----------------------------------------------------------------------------------------
    def _open_disk(self, *, rebuilt: bool = False) -> None:
        import diskcache

        assert self.directory is not None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            self._disk = diskcache.Cache(
                str(self.directory), disk=_safe_disk_class(), size_limit=self.disk_limit_mb * 1024 * 1024,
                eviction_policy="least-recently-stored", statistics=False,
            )
            for child in self.directory.iterdir():
                if child.is_file():
                    os.chmod(child, 0o600)
        except sqlite3.DatabaseError as exc:
            if rebuilt:
                self._disable(f"the cache database could not be rebuilt ({exc})")
                return
            log.warning("completion cache at %s is corrupted (%s): rebuilding it", self.directory, exc)
            self._close_disk()
            shutil.rmtree(self.directory, ignore_errors=True)
            self._open_disk(rebuilt=True)
        except OSError as exc:
            self._disable(f"{self.directory} is not usable ({exc})")

    def _disable(self, why: str) -> None:
        self._close_disk()
        self.disk_error = why
        log.warning("completion cache on disk is off: %s; the in-memory cache still works", why)

    def _close_disk(self) -> None:
        if self._disk is not None:
            try:
                self._disk.close()
            except Exception:  # noqa: BLE001 - a broken database may fail to close too
                pass
        self._disk = None

    def _disk_failed(self, exc: Exception) -> None:
        """A read or write failed after opening: corruption gets one rebuild, anything else turns the disk off."""
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            log.warning("completion cache at %s is corrupted (%s): rebuilding it", self.directory, exc)
            self._close_disk()
            shutil.rmtree(self.directory, ignore_errors=True)  # type: ignore[arg-type]
            self._open_disk(rebuilt=True)
        else:
            self._disable(str(exc))

    # ---- the cache -----------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        value = self._memory.get(key)
        if value is not None:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            self.last_layer = "memory"
            return value
        if self._disk is not None:
            try:
                raw = self._disk.get(key)
            except ValueError:  # a row we refuse to read: a tampered database
                raw = None
            except (sqlite3.Error, OSError) as exc:
                self._disk_failed(exc)
                raw = None
            value = _decode(raw) if raw is not None else None
            if value is not None:
                self._remember(key, value)
                self.stats.disk_hits += 1
                self.last_layer = "disk"
                return value
        self.stats.misses += 1
        return None

    def __contains__(self, key: str) -> bool:
        """Whether `key` is cached (memory or disk), without counting a hit or a miss."""
        if key in self._memory:
            return True
        if self._disk is None:
            return False
        try:
            return key in self._disk
        except (sqlite3.Error, OSError):
            return False

    def put(self, key: str, value: dict) -> None:
        self._remember(key, value)
        self.stats.stores += 1
        if self._disk is not None:
            text = json.dumps(value, ensure_ascii=False)
            if len(text) > MAX_VALUE_CHARS:
                return
            try:
                self._disk.set(key, text)
            except (sqlite3.Error, OSError) as exc:
                self._disk_failed(exc)

    def _remember(self, key: str, value: dict) -> None:
        if not self.memory_entries:
            return
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def close(self) -> None:
        self._close_disk()


def _decode(raw: str) -> dict | None:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        return None
    return value
