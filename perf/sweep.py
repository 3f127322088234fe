"""The characterization sweep: every model x backend x precision x batch x sequence, measured once, in one command.

    python -m perf.sweep --out DIR [engine options] [sweep options]      # measure (resumable)
    python -m perf.sweep report DIR                                       # CSV, JSON, Markdown, plots

pytest gates; the sweep characterizes.  For every configuration it records, as one JSON line appended to
``DIR/results.jsonl`` the moment it is measured (schema :data:`SWEEP_SCHEMA_VERSION`): latency median, p90,
p99 and spread from the benchmarks' own timer and round counts, throughput, the engine's own peak device
memory, the first call's time, fidelity on a fixed, seeded natural-text batch of that shape against the FP32
reference (min and mean cosine, NaN/Inf), and the CPU FP32 baseline of the same shape measured on the same
host in the same invocation (its rounds, thread count and CPU model recorded); speedups only between those.
The CPU baseline is measured first, before any engine is built, so that nothing the engines leave running
shares the host with it.  A rerun with the same ``--out`` measures only what is missing and says so; Ctrl-C
loses nothing measured (the line is written before the next configuration starts) and the run's record says
it was interrupted; an out-of-memory shape is a recorded skip with the reason.  Engines come from :mod:`engines.factory`,
selected with the same options as the tests; the timer is :mod:`perf.timing`'s.  Unlike the gate, the sweep
judges fidelity too, so it uses :mod:`fidelity.metrics` and :mod:`fidelity.corpus`; the gate's modules
(plugin, session, stats, baselines) import nothing from ``fidelity/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from engines.env import cpu_model, resolve_device, suite_commit
from engines.options import (
    ENGINE_OPTIONS,
    EngineSelection,
    Option,
    OptionError,
    add_options,
    check_creatable,
    collect,
    usage_errors,
    value_or_default,
)
from perf.timing import CPU_BASELINE_ROUNDS, CpuBaseline

SWEEP_SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
RUNS_FILE = "runs.jsonl"
BATCHES = (1, 2, 4, 8, 16, 32)
SEQUENCES = (32, 64, 128, 256, 512)
SWEEP_GRIDS: dict[str, list[tuple[int, int]]] = {
    "full": [(b, s) for b in BATCHES for s in SEQUENCES],
    "small": [(1, 32), (2, 32), (1, 64), (2, 64)],  # CPU CI: the machinery, not a measurement
}
DEFAULTS = {
    # On CUDA: the fastest PyTorch engine and the CUDA-graph eager one: 2 models x 3 precisions x 2 backends x 30
    # shapes = 360 configurations, the published table's size.
    "cuda": {"models": "bert-base,gpt2", "backends": "torch-compile,torch-cudagraph", "grid": "full", "rounds": 50,
             "warmup": 10},
    "cpu": {"models": "tiny-bert,tiny-gpt2", "backends": "torch", "grid": "small", "rounds": 10, "warmup": 2},
}
DEFAULT_PRECISIONS = "fp32,fp16,hybrid"
FIDELITY_SEED = 20261125

SWEEP_OPTIONS: tuple[Option, ...] = (
    Option("--out", "folder of the sweep's results (results.jsonl), resumed when it exists", metavar="DIR"),
    Option("--sweep-grid", "batch x sequence grid: full: batch 1-32 x sequence 32-512 (30 shapes); small: 4 shapes",
           choices=tuple(SWEEP_GRIDS), default_text="full on CUDA, small on the CPU"),
    Option("--rounds", "timed rounds per configuration", kind="int", default_text="50 on CUDA, 10 on the CPU (as the benchmarks)"),
    Option("--warmup", "untimed warm-up rounds", kind="int", default_text="10 on CUDA, 2 on the CPU"),
    Option("--cpu-rounds", "timed rounds of the CPU FP32 baseline per shape", kind="int", default=CPU_BASELINE_ROUNDS),
    Option("--no-cpu-baseline", "skip the CPU FP32 baseline (no speedups)", kind="flag"),
    Option("--no-fidelity", "skip the natural-text fidelity check of each configuration", kind="flag"),
)


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    out: Path
    grid: str
    rounds: int
    warmup: int
    cpu_rounds: int
    cpu_baseline: bool
    fidelity: bool

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "out": str(self.out)}


def config_key(engine: str, batch: int, seq: int) -> str:
    return f"{engine} b{batch} s{seq}"


# --- storage: append-only JSON lines --------------------------------------------------------------


class ResultStore:
    """``DIR/results.jsonl``: one line per configuration, appended and flushed as it is measured."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / RESULTS_FILE
        self.runs_path = folder / RUNS_FILE

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # A line cut by a crash mid-write: its configuration is measured again.
                print(f"note: {self.path}:{number} is not a whole line; its configuration is measured again",
                      file=sys.stderr)
                continue
            if record.get("schema") != SWEEP_SCHEMA_VERSION:
                raise OptionError(
                    f"{self.path} holds schema {record.get('schema')} lines; this sweep writes schema "
                    f"{SWEEP_SCHEMA_VERSION}: use another --out"
                )
            records.append(record)
        return records

    def done(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def runs(self) -> list[dict[str, Any]]:
        """The record of every run into this folder (``DIR/runs.jsonl``), oldest first."""
        if not self.runs_path.exists():
            return []
        return [json.loads(line) for line in self.runs_path.read_text().splitlines() if line.strip()]

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._append(self.path, record)

    def log_run(self, record: dict[str, Any]) -> None:
        self._append(self.runs_path, record)


# --- measuring --------------------------------------------------------------------------------------


def host_facts() -> dict[str, Any]:
    import torch

    return {"cpu_model": cpu_model(), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


class Sweep:
    def __init__(self, selection, options: SweepOptions) -> None:
        from engines.factory import EngineFactory

        self.selection = selection
        self.options = options
        self.factory = EngineFactory(selection)
        self.store = ResultStore(options.out)
        self.done = self.store.done()  # what earlier runs measured (a results file of another schema is refused)
        self.cpu = CpuBaseline(self.factory, rounds=options.cpu_rounds)
        self._corpus = None

    def configurations(self) -> list[tuple[Any, tuple[int, int]]]:
        return [(spec, shape) for spec in self.factory.specs() for shape in SWEEP_GRIDS[self.options.grid]]

    # -- pieces of one measurement --------------------------------------------------------------------
    def fidelity(self, runner, shape: tuple[int, int]) -> dict[str, Any] | None:
        """Min/mean cosine and NaN/Inf of a fixed, seeded natural-text batch of this shape against FP32."""
        import torch

        from engines.batch import TokenBatch
        from fidelity.corpus import load_corpus, packed_batch
        from fidelity.metrics import CompareContext, compare_outputs, tolerance_for

        if not self.options.fidelity:
            return None
        model = runner.model
        batch, seq = shape
        if model.tokenizer is not None:
            if self._corpus is None:
                self._corpus = load_corpus(None)[0]
            inputs = packed_batch(self._corpus, model, batch=batch, seq_len=seq)
        else:  # no tokenizer here: seeded token ids, and the line says so
            generator = torch.Generator().manual_seed(FIDELITY_SEED + batch * 1000 + seq)
            ids = torch.randint(0, model.vocab_size, (batch, seq), generator=generator)
            inputs = TokenBatch(ids, torch.ones_like(ids), source=f"seeded random ids b{batch}s{seq} (no tokenizer)")
        reference = self.factory.reference(model.name).infer(inputs)
        output = runner.infer(inputs)
        context = CompareContext(model.name, runner.backend, runner.policy.name, str(runner.device), inputs.source)
        result = compare_outputs(output, reference, inputs, context, tolerance_for(runner.policy))
        return {
            "source": inputs.source,
            "min_cosine": result.min_cosine,
            "mean_cosine": result.mean_cosine,
            "nan": result.nan_count,
            "inf": result.inf_count,
            "cosine_bar": result.tolerance.cosine_min,
            "passed": result.passed,
        }

    def measure(self, runner, shape: tuple[int, int]) -> dict[str, Any]:
        """The benchmarks' measurement of one engine at one shape (perf.session.PerfResult), with the sweep's extras."""
        from perf.session import PerfResult
        from perf.stats import relative_spread
        from perf.timing import TimedEngine, device_lock, first_call_seconds, sample_seconds, staged_inputs

        call = TimedEngine(runner, staged_inputs(runner, *shape))
        with device_lock(runner.device):  # never two engines timed on one device at once (a benchmark run beside)
            first = first_call_seconds(call)
            samples = sample_seconds(call, warmup=self.options.warmup, rounds=self.options.rounds)
            result = PerfResult.of(config_key(runner.name, *shape), call, shape, samples, cpu_fp32_median_s=None,
                                   first_call_s=first)
        if self.options.cpu_baseline:  # under the CPU's own lock
            result.cpu_fp32_median_s = self.cpu.median_seconds(runner.model.name, shape)
        return {
            **result.extra_info(),
            "spread": relative_spread(samples),
            "rounds": len(samples),
            "cpu_fp32_rounds": None if result.cpu_fp32_median_s is None else self.cpu.rounds,
            "fidelity": self.fidelity(runner, shape),
        }

    def measure_cpu_baseline(self, todo) -> None:
        """The CPU FP32 baseline of every shape still to measure, first, before any engine is built.

        Measured between GPU engines it shares the host with whatever they leave running (most likely Inductor's
        compile workers): on the H100 one bert-base b1 s64 round took 2008 ms there, 28.9 ms in another run.
        The medians go into the run's record (``runs.jsonl``), also when the run is interrupted.
        """
        from tqdm import tqdm

        shapes = list(dict.fromkeys((spec.model, shape) for spec, shape in todo))
        for model, shape in tqdm(shapes, desc="CPU FP32 baseline", unit="shape", file=sys.stderr, dynamic_ncols=True):
            self.cpu.median_seconds(model, shape)
        self.cpu.close()  # the CPU engines' memory and threads are not the GPU engines'

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, *, command: str) -> int:
        from tqdm import tqdm

        from engines.backends.base import BackendUnavailableError
        from perf.session import is_oom

        self.factory.apply_numerics()
        configs = self.configurations()
        todo = [(spec, shape) for spec, shape in configs if config_key(spec.id, *shape) not in self.done]
        print(f"sweep: {len(configs)} configurations; {len(configs) - len(todo)} already in {self.store.path} "
              f"(skipped); measuring {len(todo)}", flush=True)
        run_record = {
            "schema": SWEEP_SCHEMA_VERSION,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "commit": suite_commit(),
            "environment": self.factory.environment(),
            "numerics": self.factory.numerics_record(),
            "host": host_facts(),
            "selection": self.selection.record(),
            "options": self.options.record(),
            "planned": len(todo),
        }
        measured = 0
        status = "complete"
        started = time.perf_counter()
        try:
            if self.options.cpu_baseline:
                self.measure_cpu_baseline(todo)
                run_record["cpu_baseline_seconds"] = round(time.perf_counter() - started, 1)
            with tqdm(total=len(todo), unit="config", file=sys.stderr, dynamic_ncols=True) as bar:
                # Consecutive configurations of one engine together: each engine is built once per run.
                for spec, configs_of_spec in itertools.groupby(todo, key=lambda config: config[0]):
                    shapes = [shape for _, shape in configs_of_spec]
                    bar.set_description(spec.id)
                    try:
                        if self.options.fidelity:  # before the engine: what it holds is then "others'" memory
                            self.factory.reference(spec.model)
                        runner = self.factory.build(spec)
                    except BackendUnavailableError as exc:
                        for shape in shapes:
                            self._record(spec, shape, "skipped", reason=str(exc))
                            bar.update(1)
                        continue
                    try:
                        for shape in shapes:
                            limit_b, limit_s = runner.input_limits()
                            if shape[1] > limit_s or (limit_b is not None and shape[0] > limit_b):
                                self._record(spec, shape, "skipped", reason=f"outside the engine's limits ({limit_b}, {limit_s})")
                            else:
                                runner.release_shapes()  # earlier shapes' CUDA graphs are not this shape's memory
                                _free_device(runner)
                                try:
                                    values = self.measure(runner, shape)
                                except Exception as exc:  # noqa: BLE001 - only out-of-memory is a recorded skip
                                    if not is_oom(exc):
                                        raise
                                    _free_device(runner)
                                    self._record(spec, shape, "oom", reason=str(exc).splitlines()[0])
                                else:
                                    self._record(spec, shape, "measured", **values)
                                    measured += 1
                            bar.update(1)
                    finally:
                        runner.close()
        except KeyboardInterrupt:
            status = "interrupted"
            print(f"\nsweep interrupted: {measured} configurations measured in this run are kept in "
                  f"{self.store.path}; run the same command again to measure the rest", file=sys.stderr, flush=True)
            return 130
        except BaseException as exc:  # a crash is recorded as one, then raised
            status = "failed"
            run_record["error"] = (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0][:500]
            raise
        finally:
            run_record.update(status=status, measured=measured, seconds=round(time.perf_counter() - started, 1),
                              cpu_fp32_median_ms=self.cpu.medians())
            self.store.log_run(run_record)
            self.cpu.close()
            self.factory.close()
        print(f"sweep: {measured} measured in {run_record['seconds']} s; report with: python -m perf.sweep report "
              f"{self.options.out}", flush=True)
        return 0

    def _record(self, spec, shape: tuple[int, int], status: str, **values: Any) -> None:
        batch, seq = shape
        self.store.append({
            "schema": SWEEP_SCHEMA_VERSION,
            "key": config_key(spec.id, batch, seq),
            "engine": spec.id,
            "model": spec.model,
            "backend": spec.backend,
            "precision": spec.precision,
            "batch": batch,
            "sequence": seq,
            "status": status,
            "device": self.factory.device,
            "numerics": self.selection.numerics.name,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **values,
        })


def _free_device(runner) -> None:
    import torch

    if runner.device.type == "cuda":
        torch.cuda.empty_cache()


# --- command line ----------------------------------------------------------------------------------


def parse_run(argv: list[str]) -> tuple[Sweep, str]:
    """The sweep the command line asks for, and the command; a bad value is a usage error before anything runs."""
    parser = argparse.ArgumentParser(
        prog="python -m perf.sweep", description=__doc__.splitlines()[0],
        epilog="The report of a finished (or interrupted) sweep: python -m perf.sweep report DIR [-o OUT_DIR]",
    )
    add_options(parser.add_argument, ENGINE_OPTIONS)
    add_options(parser.add_argument, SWEEP_OPTIONS)
    args = parser.parse_args(argv)
    values = vars(args)
    try:
        engine_values = collect(values.get, ENGINE_OPTIONS)
        device = resolve_device(value_or_default(engine_values, ENGINE_OPTIONS, "device"))
        kind = device.split(":")[0]
        defaults = DEFAULTS[kind]
        if engine_values["models"] is None and not engine_values["onnx"]:
            engine_values["models"] = defaults["models"]
        if engine_values["backends"] is None and not engine_values["onnx"]:
            engine_values["backends"] = defaults["backends"]
        if engine_values["precisions"] is None:
            engine_values["precisions"] = DEFAULT_PRECISIONS
        selection = EngineSelection.from_values(engine_values)
        if not values.get("out"):
            raise OptionError("--out DIR is required: the folder the sweep appends its results to (and resumes from)")
        out = Path(values["out"]).expanduser()
        if out.exists() and not out.is_dir():
            raise OptionError(f"--out {out} is a file; give a folder")
        if not out.exists():
            check_creatable(out, source="--out", fix="give a folder that can be created (it is created if missing)")
        for dest, least in (("rounds", 5), ("warmup", 0), ("cpu_rounds", 1)):
            value = values.get(dest)
            if value is not None and value < least:
                raise OptionError(f"--{dest.replace('_', '-')} {value} is too small: give at least {least}")
        options = SweepOptions(
            out=out,
            grid=values.get("sweep_grid") or defaults["grid"],
            rounds=values.get("rounds") or defaults["rounds"],
            warmup=values["warmup"] if values.get("warmup") is not None else defaults["warmup"],
            cpu_rounds=value_or_default(values, SWEEP_OPTIONS, "cpu_rounds"),
            cpu_baseline=not values.get("no_cpu_baseline"),
            fidelity=not values.get("no_fidelity"),
        )
        from perf.timing import check_device_locks_folder

        check_device_locks_folder()  # timing holds a device lock: an unwritable lock folder is named now
        sweep = Sweep(selection, options)
        sweep.factory.check_perturbations()
    except usage_errors() as exc:
        parser.error(str(exc))
    return sweep, "python -m perf.sweep " + " ".join(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from perf.sweep_report import main as report_main

        return report_main(argv[1:])
    sweep, command = parse_run(argv)
    return sweep.run(command=command)


if __name__ == "__main__":
    raise SystemExit(main())
