"""On-disk cache for exported graphs, precision graphs and built engines.

Layout under the cache root (default: the user's cache dir, ``--engine-cache DIR``)::

    index.json                 key -> summary of every entry (rewritten under the root lock)
    entries/<key>/manifest.json   the key's fields, and name/size/sha256 of every file
    entries/<key>/...          the payload
    locks/<key>.lock           one file lock per key

* The key is the sha256 of the entry's fields: for a TensorRT engine that is the
  ONNX bytes' hash, the policy, the backend and its version, the GPU name and
  compute capability, and the builder options.  A different GPU or version is a
  different key, so its entries are never looked up; the manifest's fields are
  compared again on load, so an entry copied in by hand is refused too.
* An entry is built in a temporary folder inside the root and renamed into place,
  so readers never see half an entry; a truncated or corrupt entry (a size or
  checksum that does not match its manifest) is removed and rebuilt, with a warning.
* Concurrent processes (pytest-xdist workers) asking for the same key wait on its
  file lock: one builds, the others then load.  A whole entry is read without the
  lock (entries only ever appear by an atomic rename), so a warm cache on a
  read-only file system (a shared, pre-built cache) is used as it is; only a
  missing or damaged entry needs a writable cache, and in a read-only one it is an
  error naming ``--engine-cache``.
* Deserializing an engine is trusting it.  Entries are only ever loaded from a
  cache folder this suite wrote (its manifest says so), never from elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engines.files import atomic_write_json

CACHE_SCHEMA_VERSION = 1
WRITER = "transformer-fidelity-suite"
LOCK_TIMEOUT_S = 3600.0


class EngineCacheError(RuntimeError):
    pass


class ForeignEntryError(EngineCacheError):
    """An entry whose recorded fields (GPU, versions) differ from the ones asked for."""


class ReadOnlyCacheError(EngineCacheError):
    """The cache cannot be written and lacks (a whole copy of) the entry asked for."""


def default_cache_root() -> Path:
    env = os.environ.get("FIDELITY_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transformer-fidelity-suite" / "engines"


def _as_json(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as they read back from JSON (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(fields, default=str))


def cache_key(fields: dict[str, Any]) -> str:
    payload = json.dumps({"schema": CACHE_SCHEMA_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class CacheEvent:
    key: str
    kind: str  # fields["artifact"]
    outcome: str  # "hit", "built", "rebuilt-corrupt", "rebuilt-forced"
    seconds: float
    note: str = ""


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    fields: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class EngineCache:
    def __init__(self, root: Path | None = None, *, rebuild: bool = False, session_start: float | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.rebuild = rebuild
        # --rebuild-engines means entries older than this session: another process of the session (a
        # pytest-xdist worker, given the controller's start) may have rebuilt one already.
        self.session_start = time.time() if session_start is None else session_start
        self.events: list[CacheEvent] = []
        self._rebuilt_this_session: set[str] = set()

    def writable(self) -> bool:
        """Whether entries can be added: the root (or the folder it would be created in) takes a new file."""
        folder = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if folder is None or not folder.is_dir():
            return False
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe."):
                return True
        except OSError:  # EROFS, EACCES: a read-only mount or folder
            return False

    # -- paths and locks ---------------------------------------------------------------
    def entry_path(self, key: str) -> Path:
        return self.root / "entries" / key

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        from filelock import FileLock, Timeout

        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / "locks" / f"{name}.lock"))
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout as exc:
            raise EngineCacheError(
                f"waited {LOCK_TIMEOUT_S:.0f} s for the cache lock {lock.lock_file}; another process holds it. "
                "If none is running, delete the lock file."
            ) from exc

    # -- validation --------------------------------------------------------------------
    def _read_valid(self, key: str, fields: dict[str, Any]) -> CacheEntry | None:
        """The entry for ``key`` if it is whole and was built for ``fields``; None if absent.

        Raises ForeignEntryError for an entry built for other fields, ValueError if corrupt.
        """
        path = self.entry_path(key)
        manifest_path = path / "manifest.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable manifest ({exc})") from exc
        if manifest.get("writer") != WRITER or manifest.get("schema") != CACHE_SCHEMA_VERSION:
            raise ValueError("not written by this suite's cache (schema or writer differs)")
        recorded = manifest.get("fields", {})
        if recorded != fields:
            differing = sorted(k for k in set(recorded) | set(fields) if recorded.get(k) != fields.get(k))
            raise ForeignEntryError(
                f"cache entry {key} was built for other "
                + ", ".join(f"{k}={recorded.get(k)!r} (here {fields.get(k)!r})" for k in differing)
            )
        for name, meta in manifest.get("files", {}).items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["size"]:
                raise ValueError(f"{name} is missing or truncated")
            if _sha256(file) != meta["sha256"]:
                raise ValueError(f"{name} fails its checksum")
        return CacheEntry(key, path, recorded)

    def _lookup(self, key: str, fields: dict[str, Any]) -> tuple[CacheEntry | None, str | None]:
        """``(entry, None)`` when whole, ``(None, why)`` when damaged, ``(None, None)`` when absent.

        An entry built for other fields (another GPU or version) raises: it is never
        loaded, and never silently replaced either.
        """
        try:
            return self._read_valid(key, fields), None
        except ForeignEntryError as exc:
            raise ForeignEntryError(
                f"{exc}. It is not loaded. Remove {self.entry_path(key)} or use another --engine-cache."
            ) from None
        except ValueError as exc:
            return None, str(exc)

    # -- the one public operation -------------------------------------------------------
    def get_or_build(
        self, fields: dict[str, Any], build: Callable[[Path], Any], *, description: str = ""
    ) -> CacheEntry:
        """The entry for ``fields``, building it with ``build(folder)`` when absent or bad."""
        fields = _as_json(fields)  # compared with, and stored as, what a manifest reads back
        key = cache_key(fields)
        kind = str(fields.get("artifact", "entry"))
        started = time.perf_counter()
        force = self.rebuild and key not in self._rebuilt_this_session and not self._built_this_session(key)
        if not force:
            # A whole entry needs no lock: entries appear only by an atomic rename.
            entry, _ = self._lookup(key, fields)
            if entry is not None:
                self.events.append(CacheEvent(key, kind, "hit", time.perf_counter() - started))
                return entry
        if not self.writable():
            raise ReadOnlyCacheError(
                f"the engine cache {self.root} is read-only and has no usable entry for {description or kind} "
                f"(key {key}); point --engine-cache at a writable folder, or build the entry there first "
                "with a run that can write it"
            )
        with self.lock(key):
            outcome, note = "built", ""
            if force and self._built_this_session(key):  # another worker rebuilt it while this one waited
                force = False
            if force:
                outcome = "rebuilt-forced"
            else:
                entry, damage = self._lookup(key, fields)  # again: another process may have built it meanwhile
                if entry is not None:
                    self.events.append(CacheEvent(key, kind, "hit", time.perf_counter() - started))
                    return entry
                if damage is not None:
                    warnings.warn(f"engine cache: {description or kind} entry {key} is corrupt ({damage}); rebuilding")
                    outcome, note = "rebuilt-corrupt", damage
            entry = self._build(key, fields, build, description)
            self._rebuilt_this_session.add(key)
            self.events.append(CacheEvent(key, kind, outcome, time.perf_counter() - started, note))
            return entry

    def _built_this_session(self, key: str) -> bool:
        try:
            return self.entry_path(key).stat().st_mtime >= self.session_start
        except OSError:
            return False

    def _build(self, key: str, fields: dict[str, Any], build: Callable[[Path], Any], description: str) -> CacheEntry:
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root / "entries"))
        final = self.entry_path(key)
        try:
            build(staging)
            files = {
                p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(staging.iterdir())
                if p.is_file()
            }
            manifest = {
                "writer": WRITER,
                "schema": CACHE_SCHEMA_VERSION,
                "key": key,
                "fields": fields,
                "description": description,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            atomic_write_json(staging / "manifest.json", manifest)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise EngineCacheError(
                    f"no space left on the device holding the engine cache {self.root} while building "
                    f"{description or key}; free space or point --engine-cache at another disk"
                ) from exc
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._update_index(key, fields, description)
        return CacheEntry(key, final, fields)

    def _update_index(self, key: str, fields: dict[str, Any], description: str) -> None:
        with self.lock("index"):
            index_path = self.root / "index.json"
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = {"schema": CACHE_SCHEMA_VERSION, "entries": {}}
            index["entries"][key] = {"description": description, "fields": fields}
            atomic_write_json(index_path, index, sort_keys=True)

    def summary(self) -> str:
        return describe_events(self.root, [(e.outcome, e.seconds) for e in self.events])


def describe_events(root, events, *, workers: int = 0) -> str:
    """One line over (outcome, seconds) cache events: this process's, or (``workers``) every xdist worker's."""
    tally: dict[str, int] = {}
    for outcome, _ in events:
        tally[outcome] = tally.get(outcome, 0) + 1
    parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items())) or "unused"
    where = f" over {workers} workers" if workers else ""
    return f"engine cache {root}: {parts} ({sum(seconds for _, seconds in events):.1f} s{where})"
