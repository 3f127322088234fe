import errno
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from engines.cache import EngineCache, EngineCacheError, ForeignEntryError, cache_key

FIELDS = {"artifact": "trt-engine", "model": "tiny-bert", "policy": "hybrid", "gpu": "NVIDIA H100 80GB HBM3",
          "compute_capability": "9.0", "tensorrt": "10.16.1"}


def writer(payload: bytes = b"plan-bytes" * 100):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "engine.plan").write_bytes(payload)

    return build, calls


def test_second_request_is_a_hit(tmp_path):
    cache = EngineCache(tmp_path)
    build, calls = writer()
    first = cache.get_or_build(FIELDS, build)
    second = cache.get_or_build(FIELDS, build)
    assert len(calls) == 1 and first.path == second.path
    assert (second.path / "engine.plan").read_bytes() == b"plan-bytes" * 100
    assert [e.outcome for e in cache.events] == ["built", "hit"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert list(index["entries"]) == [first.key]
    # a fresh process (a new EngineCache) hits too: nothing is rebuilt across sessions
    again = EngineCache(tmp_path)
    again.get_or_build(FIELDS, build)
    assert len(calls) == 1 and again.events[0].outcome == "hit"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, damage):
    cache = EngineCache(tmp_path)
    build, calls = writer()
    entry = cache.get_or_build(FIELDS, build)
    plan = entry.path / "engine.plan"
    if damage == "truncate":
        plan.write_bytes(plan.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(plan.read_bytes())
        data[5] ^= 0xFF
        plan.write_bytes(bytes(data))
    else:
        plan.unlink()
    with pytest.warns(UserWarning, match="is corrupt"):
        rebuilt = cache.get_or_build(FIELDS, build)
    assert len(calls) == 2 and cache.events[-1].outcome == "rebuilt-corrupt"
    assert (rebuilt.path / "engine.plan").read_bytes() == b"plan-bytes" * 100


def test_entry_for_another_gpu_or_version_is_never_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    build, calls = writer()
    cache.get_or_build(FIELDS, build)
    # Another GPU is another key: built separately, the H100 entry untouched.
    a100 = dict(FIELDS, gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    assert cache.get_or_build(a100, build).key != cache_key(FIELDS)
    assert len(calls) == 2
    # An entry copied in under this key by hand, recorded for another stack, is refused.
    entry_dir = cache.entry_path(cache_key(FIELDS))
    manifest = json.loads((entry_dir / "manifest.json").read_text())
    manifest["fields"]["tensorrt"] = "11.0.0"
    (entry_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ForeignEntryError, match=r"tensorrt='11.0.0' \(here '10.16.1'\).*It is not loaded"):
        cache.get_or_build(FIELDS, build)
    assert len(calls) == 2


def test_folder_not_written_by_the_suite_is_not_trusted(tmp_path):
    cache = EngineCache(tmp_path)
    build, calls = writer()
    foreign = cache.entry_path(cache_key(FIELDS))
    foreign.mkdir(parents=True)
    (foreign / "engine.plan").write_bytes(b"someone else's plan")
    (foreign / "manifest.json").write_text(json.dumps({"writer": "somebody", "fields": FIELDS, "files": {}}))
    with pytest.warns(UserWarning, match="not written by this suite"):
        entry = cache.get_or_build(FIELDS, build)
    assert (entry.path / "engine.plan").read_bytes() == b"plan-bytes" * 100 and len(calls) == 1


def test_forced_rebuild_happens_once_per_session(tmp_path):
    build, calls = writer()
    EngineCache(tmp_path).get_or_build(FIELDS, build)
    forcing = EngineCache(tmp_path, rebuild=True)
    forcing.get_or_build(FIELDS, build)
    forcing.get_or_build(FIELDS, build)
    assert len(calls) == 2 and [e.outcome for e in forcing.events] == ["rebuilt-forced", "hit"]


def test_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    cache = EngineCache(tmp_path)

    def build(folder: Path) -> None:
        (folder / "engine.plan").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EngineCacheError, match="no space left.*--engine-cache"):
        cache.get_or_build(FIELDS, build)
    assert list((tmp_path / "entries").iterdir()) == []


def _race(root: str, out: str) -> None:
    def build(folder: Path) -> None:
        with open(Path(root) / "builds.log", "a") as log:
            log.write("build\n")
        time.sleep(1.0)  # long enough for the other process to arrive and wait on the lock
        (folder / "engine.plan").write_bytes(b"x" * 1000)

    entry = EngineCache(Path(root)).get_or_build(FIELDS, build)
    Path(out).write_text((entry.path / "engine.plan").read_text())


def test_two_processes_racing_for_one_engine_build_it_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_race, args=(str(tmp_path), str(tmp_path / f"out{i}"))) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert (tmp_path / "out0").read_text() == (tmp_path / "out1").read_text() == "x" * 1000


_READ_ONLY_LOOKUP = """
import json, sys
from pathlib import Path
from engines.cache import EngineCache, ReadOnlyCacheError
cache = EngineCache(Path(sys.argv[1]))
fields = json.loads(sys.argv[2])
def build(folder):
    raise AssertionError("a warm read-only cache must not build")
entry = cache.get_or_build(fields, build)
hit = (entry.path / "engine.plan").read_bytes() == b"plan-bytes" * 100
try:
    cache.get_or_build(dict(fields, policy="fp16"), build)
    missing = "built?"
except ReadOnlyCacheError as exc:
    missing = str(exc)
print(json.dumps({"hit": hit, "events": [e.outcome for e in cache.events], "missing": missing}))
"""


def test_a_warm_cache_on_a_read_only_file_system_is_used_as_it_is(tmp_path):
    """A real read-only mount (user and mount namespaces): no lock file, no write, the entry is used."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare for a read-only mount without privileges")
    cache_dir = tmp_path / "cache"
    EngineCache(cache_dir).get_or_build(FIELDS, writer()[0])
    root = Path(__file__).resolve().parents[2]
    mount = f"mount --bind {cache_dir} {cache_dir} && mount -o remount,ro,bind {cache_dir}"
    script = f'{mount} && exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, sys.executable, _READ_ONLY_LOOKUP,
         str(cache_dir), json.dumps(FIELDS)],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"this machine allows no unprivileged mount namespace: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hit"] and result["events"] == ["hit"]
    assert "is read-only and has no usable entry" in result["missing"] and "--engine-cache" in result["missing"]
