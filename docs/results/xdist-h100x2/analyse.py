"""Where a -n 2 nightly run's time went, against the one-process run: from the runs' logs and reports.

    python docs/results/xdist-h100x2/analyse.py docs/results/xdist-h100x2/nightly > docs/results/xdist-h100x2/nightly/analysis.txt
    python docs/results/xdist-h100x2/analyse.py docs/results/xdist-h100x2/nightly/work-order --serial docs/results/xdist-h100x2/nightly
    python docs/results/xdist-h100x2/analyse.py docs/results/xdist-h100x2/nightly/same-host > docs/results/xdist-h100x2/nightly/same-host/analysis.txt

Reads FOLDER/{times.txt, xdist.json, xdist.log} and the one-process run's {times.txt, serial.json, serial.log}
(FOLDER itself unless --serial names another folder). Each test's duration comes from pytest's --durations
lines (all of them with --durations=0; with fewer, the per-device totals cover only the tests listed); a test
counts for the device its engine ran on (the report's "engines").
"""

import argparse
import collections
import json
import re
from pathlib import Path

DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+\S+\[(.+?)\]$", re.M)
WALL = re.compile(r"^(\w+) rc=(\d+) wall ([\d.]+) s", re.M)
PYTEST_SECONDS = re.compile(r"passed.* in ([\d.]+)s")
FIELDS = ("samples", "min_cosine", "mean_cosine", "max_abs_err", "nan_count", "inf_count", "verdict")


def run(folder: Path, mode: str) -> dict:
    report = json.loads((folder / f"{mode}.json").read_text())
    log = (folder / f"{mode}.log").read_text()
    walls = {m.group(1): (int(m.group(2)), float(m.group(3))) for m in WALL.finditer((folder / "times.txt").read_text())}
    durations = [(float(t), phase, engine) for t, phase, engine in DURATION.findall(log)]
    return {"report": report, "wall": walls[mode], "pytest_s": float(PYTEST_SECONDS.findall(log)[-1]),
            "durations": durations, "listed": f"{len(durations)}" + ("" if "slowest durations" in log else
                                                                      " (only the slowest: totals partial)")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--serial", type=Path, help="the folder of the one-process run (default: FOLDER)")
    args = parser.parse_args()
    xdist, serial = run(args.folder, "xdist"), run(args.serial or args.folder, "serial")
    print(f"one process: exit {serial['wall'][0]}, wall {serial['wall'][1]} s, pytest {serial['pytest_s']} s")
    print(f"-n 2:        exit {xdist['wall'][0]}, wall {xdist['wall'][1]} s, pytest {xdist['pytest_s']} s")
    print(f"speedup (wall): {serial['wall'][1] / xdist['wall'][1]:.2f}x"
          + ("" if args.serial is None else f" (the one-process run from {args.serial}: another host unless it says so)"))
    rows = {(r["model"], r["backend"], r["precision"], r["input_source"]): r for r in serial["report"]["rows"]}
    other = {(r["model"], r["backend"], r["precision"], r["input_source"]): r for r in xdist["report"]["rows"]}
    differ = [(key, f) for key in rows for f in FIELDS if key in other and rows[key][f] != other[key][f]]
    print(f"rows: {len(rows)} and {len(other)}, the same keys: {set(rows) == set(other)}; "
          f"fields that differ ({', '.join(FIELDS)}): {len(differ)}")
    device = {engine: info.get("device") for engine, info in xdist["report"]["engines"].items()}
    per_device = collections.Counter()
    models = collections.defaultdict(set)
    for seconds, _, engine in xdist["durations"]:
        per_device[device.get(engine)] += seconds
        models[device.get(engine)].add(engine.split("/")[0])
    print(f"-n 2 test durations listed: {xdist['listed']}; per device (s):")
    for dev, seconds in sorted(per_device.items(), key=lambda kv: str(kv[0])):
        print(f"  {dev}: {seconds:.1f} ({', '.join(sorted(models[dev]))})")
    if per_device:
        busiest = max(per_device.values())
        print(f"  pytest's time beyond the busier device's tests: {xdist['pytest_s'] - busiest:.1f} s; "
              f"wall beyond them: {xdist['wall'][1] - busiest:.1f} s")
    serial_sum = sum(seconds for seconds, _, _ in serial["durations"])
    print(f"one process: {serial['listed']} durations listed, {serial_sum:.1f} s; -n 2: "
          f"{sum(s for s, _, _ in xdist['durations']):.1f} s over both workers")
    print("FP32 export setups (s), one process / -n 2:")
    setups = {mode: {e: s for s, phase, e in r["durations"] if phase == "setup" and e.endswith("/fp32") and "onnx" in e}
              for mode, r in (("serial", serial), ("xdist", xdist))}
    for engine in sorted(set(setups["serial"]) | set(setups["xdist"])):
        print(f"  {engine}: {setups['serial'].get(engine, '-')} / {setups['xdist'].get(engine, '-')}")
    waits = [(e["kind"], round(e["seconds"], 1)) for e in xdist["report"]["engine_cache"]["events"]
             if e["outcome"] == "hit" and e["seconds"] > 1]
    print(f"-n 2 engine cache hits over 1 s (a wait on another worker's build): {waits or 'none'}")


if __name__ == "__main__":
    main()
