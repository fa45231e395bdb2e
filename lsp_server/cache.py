"""The response cache: the model's text for an exact prompt, in memory (LRU) and on disk (diskcache).

With greedy sampling the model's output is a function of the model file, the template and the prompt,
so the key is a hash over exactly those (plus the generation parameters) and a hit skips the model; the
post-processing still runs against the document as it is now. Only the raw model text is stored, as
JSON text: diskcache unpickles rows of its pickle mode (CVE-2025-69872), so the disk layer here refuses
every row that is not plain inline text. The folder is private (0700, files 0600).

Faults never reach the caller, and each costs at most one warning until the disk works again: every disk
operation gives up after OP_TIMEOUT_S (another process holding the database: a miss); a corrupted database
is set aside as `cache.db.corrupt-<unix time>` and rebuilt, at most once per REBUILD_EVERY_S; any other
failure (a folder that cannot be written, a full disk, an I/O error) turns the disk layer off for
RETRY_AFTER_S, and the memory layer keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("offpilot.cache")

MAX_VALUE_CHARS = 64 * 1024
"""A model answer is at most a few KB; anything bigger is not stored (and would not be read back)."""
OP_TIMEOUT_S = 0.2
"""Longest wait for the database (SQLite's busy timeout): the cache is read on the way to every answer."""
REBUILD_EVERY_S = 3600.0
"""A database found corrupted again within this long after the last rebuild turns the disk layer off instead."""
RETRY_AFTER_S = 300.0
"""A disk layer turned off by an error (full disk, unwritable folder) is tried again after this long."""
DB_NAME = "cache.db"


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


def _transient(exc: Exception) -> bool:
    """Another process holds the database: skip this operation, the next one will likely work."""
    import diskcache

    return isinstance(exc, diskcache.Timeout) or (
        isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in ("locked", "busy")))


def _corrupt(exc: Exception) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)


class CompletionCache:
    def __init__(self, *, memory_entries: int = 512, directory: Path | None = None, disk_limit_mb: int = 64,
                 clock=time.monotonic) -> None:
        self.memory_entries = max(0, memory_entries)
        self._memory: OrderedDict[str, dict] = OrderedDict()
        self.directory = directory
        self.disk_limit_mb = disk_limit_mb
        self._disk = None
        self.disk_error = ""
        self.stats = CacheStats()
        self.last_layer = ""
        """Where the last hit came from: "memory" or "disk"."""
        self.faults = 0
        """Disk operations that failed (each a miss or a skipped store)."""
        self._clock = clock
        self._warned = False
        """A warning was logged in the current episode of disk trouble (it ends when the disk works again)."""
        self._retry_at: float | None = None
        if directory is not None:
            self._open_disk()

    # ---- disk ----------------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        if self._warned:
            log.debug("completion cache: %s", message)
        else:
            self._warned = True
            log.warning("completion cache: %s", message)

    def _worked(self) -> None:
        if self._warned:
            self._warned = False
            log.info("completion cache on disk works again")

    def _open_disk(self, *, rebuilt: bool = False) -> None:
        import diskcache

        assert self.directory is not None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            self._probe()
            self._disk = diskcache.Cache(
                str(self.directory), timeout=OP_TIMEOUT_S, disk=_safe_disk_class(),
                size_limit=self.disk_limit_mb * 1024 * 1024, eviction_policy="least-recently-stored", statistics=False,
            )
            for child in self.directory.iterdir():
                if child.is_file():
                    os.chmod(child, 0o600)
            self.disk_error = ""
        except Exception as exc:  # noqa: BLE001 - whatever the disk does, completions go on
            self._close_disk()
            if _corrupt(exc) and not rebuilt:
                self._set_aside(exc)
            else:
                self._disable(f"{self.directory} is not usable ({type(exc).__name__}: {exc})")

    def _probe(self) -> None:
        """Fail within OP_TIMEOUT_S when another process holds the database: diskcache's constructor waits for
        a lock up to 60 s (its own retry loop), and the cache is opened on the way to an answer."""
        db = self.directory / DB_NAME  # type: ignore[operator]
        if not db.exists():
            return
        con = sqlite3.connect(str(db), timeout=OP_TIMEOUT_S, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()

    def _set_aside(self, exc: Exception) -> None:
        """Rename a corrupted database to cache.db.corrupt-<time> (kept for a bug report: only the newest) and
        start an empty one; a second corruption within REBUILD_EVERY_S turns the disk layer off instead."""
        assert self.directory is not None
        db = self.directory / DB_NAME
        previous = sorted(self.directory.glob(DB_NAME + ".corrupt-*"))
        try:
            if previous and time.time() - previous[-1].stat().st_mtime < REBUILD_EVERY_S:
                self._disable(f"the database is corrupted again ({exc}), less than an hour after the last rebuild")
                return
            for old in previous:
                old.unlink()
            aside = self.directory / f"{DB_NAME}.corrupt-{int(time.time())}"
            os.replace(db, aside)
            os.utime(aside)  # its time says when it was set aside (the once-an-hour rule)
            for suffix in ("-wal", "-shm"):
                (self.directory / (DB_NAME + suffix)).unlink(missing_ok=True)
        except OSError as rename_error:
            self._disable(f"the database is corrupted ({exc}) and could not be set aside ({rename_error})")
            return
        self._warn(f"the database at {db} is corrupted ({exc}): set aside as {aside.name}, starting an empty one")
        self._open_disk(rebuilt=True)

    def _disable(self, why: str) -> None:
        self._close_disk()
        self.disk_error = why
        self._retry_at = self._clock() + RETRY_AFTER_S
        self._warn(f"the disk layer is off: {why}; the in-memory cache still works")

    def _close_disk(self) -> None:
        if self._disk is not None:
            try:
                self._disk.close()
            except Exception:  # noqa: BLE001 - a broken database may fail to close too
                pass
        self._disk = None

    def _usable_disk(self):
        """The disk layer, opened again once RETRY_AFTER_S has passed since it was turned off."""
        if self._disk is None and self._retry_at is not None and self._clock() >= self._retry_at:
            self._retry_at = None
            self._open_disk()
        return self._disk

    def _disk_failed(self, exc: Exception) -> None:
        """A read or write failed after opening: a held lock skips it, corruption gets the rebuild, anything
        else (full disk, I/O error, the folder gone read-only) turns the disk off for a while."""
        self.faults += 1
        if _transient(exc):
            self._warn(f"the database is busy ({exc}): skipped")
        elif _corrupt(exc):
            self._close_disk()
            self._set_aside(exc)
        else:
            self._disable(f"{type(exc).__name__}: {exc}")

    # ---- the cache -----------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        value = self._memory.get(key)
        if value is not None:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            self.last_layer = "memory"
            return value
        disk = self._usable_disk()
        if disk is not None:
            try:
                raw = disk.get(key)
                self._worked()
            except ValueError:  # a row we refuse to read: a tampered database
                raw = None
            except Exception as exc:  # noqa: BLE001 - no disk fault reaches the caller
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
        disk = self._usable_disk()
        if disk is None:
            return False
        try:
            return key in disk
        except Exception as exc:  # noqa: BLE001
            self._disk_failed(exc)
            return False

    def put(self, key: str, value: dict) -> None:
        self._remember(key, value)
        self.stats.stores += 1
        disk = self._usable_disk()
        if disk is not None:
            text = json.dumps(value, ensure_ascii=False)
            if len(text) > MAX_VALUE_CHARS:
                return
            try:
                disk.set(key, text)
                self._worked()
            except Exception as exc:  # noqa: BLE001 - no disk fault reaches the caller
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
