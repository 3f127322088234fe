"""``fidelity-gate``: may the candidate stack ship?  Exit 0 pass, 1 regression, 2 usage error or refusal.

    fidelity-gate compare CANDIDATE [--baseline BASELINE]   one verdict (Markdown on stdout, --markdown, --json)
    fidelity-gate save RESULTS --name NAME                    store a complete run as this machine's baseline
    fidelity-gate history HISTORY                             step changes across nightly runs, and their stack change
    fidelity-gate merge SET [SET ...] --out DIR              shares of one night from several hosts: one result
                                                              folder per architecture, DIR/<machine id>/

CANDIDATE, BASELINE and RESULTS are result folders (``fidelity.json`` and/or
``perf.json``, as ``.ci/nightly`` writes them) or the files themselves.  Without
``--baseline`` the candidate is compared with the newest complete stored baseline of
its machine id under ``--baselines`` ($FIDELITY_BASELINES, else ./baselines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines.files import write_or_print
from engines.tables import render_table
from gate import history as hist
from gate.results import ResultSet, ResultSetError
from gate.store import HISTORY_FILE, default_root, machine_folder, save, stored
from gate.verdict import EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE, Thresholds, compare


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    d = Thresholds()
    group = parser.add_argument_group("thresholds")
    group.add_argument("--threshold", type=float, default=d.latency, help=f"latency slowdown that fails (default {d.latency:.0%})")
    group.add_argument("--memory-threshold", type=float, default=d.memory, help=f"peak memory growth that fails (default {d.memory:.0%})")
    group.add_argument("--suite-threshold", type=float, default=d.suite, help=f"geometric-mean slowdown of all items that fails (default {d.suite:.0%})")
    group.add_argument("--alpha", type=float, default=d.alpha, help=f"significance level of the latency test (default {d.alpha:g})")
    group.add_argument("--drift-factor", type=float, default=d.drift_factor, help=f"fidelity error growth that fails (default {d.drift_factor:g}x)")
    group.add_argument("--drift-floor", type=float, default=d.drift_floor, help=f"fidelity error under which nothing fails (default {d.drift_floor:g})")
    group.add_argument("--inconclusive", choices=("report", "fail"), default=d.inconclusive,
                       help="a latency difference beyond the threshold that is not significant: report it or fail")


def _thresholds(args: argparse.Namespace) -> Thresholds:
    values = Thresholds(args.threshold, args.memory_threshold, args.suite_threshold, args.alpha, args.drift_factor,
                        args.drift_floor, args.inconclusive)
    if min(values.latency, values.memory, values.suite, values.drift_floor) < 0 or not 0 < values.alpha < 1 \
            or values.drift_factor <= 1:
        raise ResultSetError("thresholds must be >= 0, --alpha in (0, 1) and --drift-factor > 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidelity-gate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="one verdict for a candidate against a baseline")
    c.add_argument("candidate", type=Path, nargs="+", help="result folder, or its fidelity report and benchmark JSON")
    c.add_argument("--baseline", type=Path, nargs="+", help="result folder or files (default: the stored baseline)")
    c.add_argument("--baselines", type=Path, help="baselines root (default: $FIDELITY_BASELINES, else ./baselines)")
    c.add_argument("--markdown", type=Path, help="write the Markdown report here too (a CI job summary)")
    c.add_argument("--json", type=Path, help="write the JSON verdict here")
    c.add_argument("--history", type=Path, help="append this run's summary to this history (JSON lines)")
    _add_thresholds(c)
    s = sub.add_parser("save", help="store a complete run as its machine's newest baseline")
    s.add_argument("results", type=Path, nargs="+", help="result folder, or its fidelity report and benchmark JSON")
    s.add_argument("--name", required=True, help="the baseline's name (NNNN_NAME.json)")
    s.add_argument("--baselines", type=Path, help="baselines root (default: $FIDELITY_BASELINES, else ./baselines)")
    s.add_argument("--history", type=Path, help=f"record the refresh here (default: <root>/<machine id>/{HISTORY_FILE})")
    m = sub.add_parser("merge", help="result folders of several hosts (one share each): one per architecture")
    m.add_argument("sets", type=Path, nargs="+", help="result folders (each fidelity.json and/or perf.json)")
    m.add_argument("--out", type=Path, required=True, help="where DIR/<machine id>/ result folders are written")
    h = sub.add_parser("history", help="step changes across a history, with the stack change that coincides")
    h.add_argument("history", type=Path)
    h.add_argument("--min-step", type=float, default=hist.DEFAULT_MIN_STEP,
                   help=f"smallest latency step reported (default {hist.DEFAULT_MIN_STEP:.0%}; fidelity: the drift factor)")
    h.add_argument("--markdown", type=Path, help="write the Markdown report here too")
    h.add_argument("--json", type=Path, help="write the change points as JSON here")
    return parser


def _compare(args: argparse.Namespace) -> int:
    thresholds = _thresholds(args)
    candidate = ResultSet.load(*args.candidate)
    if args.baseline:
        baseline = ResultSet.load(*args.baseline)
    else:
        baseline = stored(args.baselines or default_root(), candidate.machine_id,
                          want_fidelity=candidate.fidelity is not None, want_perf=candidate.perf is not None)
    try:
        result = compare(baseline, candidate, thresholds)
    except ResultSetError as exc:
        if args.baseline:
            raise
        raise ResultSetError(f"{exc} (the stored baseline chosen: {baseline.label}; name another with --baseline)") from None
    text = result.markdown()
    print(text)
    if args.markdown:
        write_or_print(text, args.markdown)
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    if args.history:
        hist.append(args.history, hist.run_line(result))
    return result.exit_code


def _save(args: argparse.Namespace) -> int:
    results = ResultSet.load(*args.results)
    root = args.baselines or default_root()
    written = save(results, root, args.name)
    history = args.history or machine_folder(root, results.machine_id) / HISTORY_FILE
    hist.append(history, hist.baseline_line(results, written))
    for path in written:
        print(f"saved {path}")
    print(f"recorded in {history}")
    return EXIT_PASS


def _merge(args: argparse.Namespace) -> int:
    from gate.merge import check_out, merge, write

    check_out(args.out)
    merged = merge([ResultSet.load(path) for path in args.sets])
    write(merged, args.out)
    rows = [(machine, len(parts["parts"]), len((parts["fidelity"] or {}).get("rows") or []),
             len((parts["perf"] or {}).get("benchmarks") or []), str(args.out / machine))
            for machine, parts in merged.items()]
    print(render_table(("machine id", "result sets", "fidelity rows", "benchmarks", "merged into"), rows, markdown=True))
    return EXIT_PASS


def _history(args: argparse.Namespace) -> int:
    lines = hist.read(args.history)
    points = hist.change_points(lines, min_step=args.min_step)
    runs = sum(1 for line in lines if line.get("event") == "run")
    refreshes = [line for line in lines if line.get("event") == "baseline"]
    out = [f"# History: {args.history}", "", f"{runs} nightly runs, {len(refreshes)} baseline refreshes "
           f"({', '.join(line['time'] for line in refreshes) or 'none'}); {len(points)} step change(s).", ""]
    if points:
        out.append(render_table(
            ("series", "metric", "run", "time", "before", "after", "ratio", "coinciding stack change"),
            [(p.series, p.metric, p.index, p.time, f"{p.before:.4g}", f"{p.after:.4g}", f"{p.ratio:.2f}x",
              p.stack_change) for p in points],
            markdown=True))
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        write_or_print(text, args.markdown)
    if args.json:
        args.json.write_text(json.dumps([{**p.__dict__, "ratio": p.ratio} for p in points], indent=2) + "\n")
    return EXIT_REGRESSION if any(p.ratio > 1 for p in points) else EXIT_PASS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"compare": _compare, "save": _save, "history": _history, "merge": _merge}[args.command](args)
    except ResultSetError as exc:
        print(f"fidelity-gate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
