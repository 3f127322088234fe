"""Hardware floors and the Markdown report of a saved perf run."""

import json

import pytest

from engines.models import get_spec
from perf.report import load_rows, main, render
from perf.roofline import GPU_PEAKS, forward_cost

H100 = GPU_PEAKS["NVIDIA H100 80GB HBM3"]


def test_bert_base_b1_s128_is_bound_by_reading_its_half_weights():
    spec = get_spec("bert-base")
    cost = forward_cost(spec.family, spec.config_kwargs, "hybrid", 1, 128)
    assert cost.weight_bytes == 12 * (4 * 768 * 768 + 2 * 768 * 3072) * 2  # 84.9M GEMM weights in FP16
    assert cost.bound(H100, "hybrid") == "memory"
    assert cost.floor_s(H100, "hybrid") == pytest.approx((cost.weight_bytes + 128 * 768 * 4) / 3.35e12)


def test_large_shapes_are_compute_bound_and_fp32_uses_the_fp32_peak():
    spec = get_spec("bert-base")
    half = forward_cost(spec.family, spec.config_kwargs, "fp16", 32, 512)
    full = forward_cost(spec.family, spec.config_kwargs, "fp32", 32, 512)
    assert half.bound(H100, "fp16") == "compute" and half.flops == full.flops
    assert full.floor_s(H100, "fp32") == pytest.approx(full.flops / 66.9e12)


def test_gpt2_counts_its_lm_head_and_logits():
    spec = get_spec("gpt2")
    cost = forward_cost(spec.family, spec.config_kwargs, "hybrid", 1, 128)
    assert cost.output_bytes == 128 * 50257 * 4
    assert cost.weight_bytes == (12 * (4 * 768**2 + 2 * 768 * 3072) + 768 * 50257) * 2


def _benchmark(engine, batch, seq, median_ms, speedup=None):
    return {
        "extra_info": {
            "engine": engine, "batch": batch, "sequence": seq, "median_ms": median_ms, "p99_ms": median_ms * 1.1,
            "tokens_per_s": batch * seq / median_ms * 1e3, "peak_device_bytes": 2**30, "speedup_over_cpu_fp32": speedup,
        }
    }


def test_report_checks_each_target_against_the_best_engine(tmp_path):
    data = {
        "machine_info": {"fidelity_suite": {"machine_id": "sm90-NVIDIA_H100_80GB_HBM3", "gpu": "NVIDIA H100 80GB HBM3"}},
        "benchmarks": [
            _benchmark("bert-base/torch-compile/hybrid", 1, 128, 0.25, speedup=160.0),
            _benchmark("bert-base/torch-cudagraph/hybrid", 1, 128, 1.8, speedup=22.0),
            _benchmark("gpt2/torch-compile/hybrid", 1, 128, 0.5),
            _benchmark("bert-base/torch-compile/fp32", 1, 128, 1.0),
        ],
    }
    text = " ".join(render(data, source="x.json").split())  # table cells are padded to their column
    assert "| bert-base hybrid b1 s128 <= 0.3 ms | torch-compile | 0.250 ms | yes |" in text
    assert "| gpt2 hybrid b1 s128 within 1.5x of bert-base | torch-compile | 2.00x (0.500 vs 0.250 ms) | **no** |" in text
    assert "| bert-base hybrid b1 s128 >= 150x over host CPU FP32 | torch-compile | 160.0x | yes |" in text
    assert "| bert-base hybrid b32 s512 <= 5 ms | not measured |" in text
    assert "| bert-base | torch-compile | 1 | 128 | 1.000 | - | 4.00x |" in text  # hybrid vs fp32, same backend


def test_report_cli_refuses_a_file_without_suite_results(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "test_x", "extra_info": {}}]}))
    with pytest.raises(SystemExit) as exc:
        main([str(path)])
    assert exc.value.code == 2
    assert "no perf results of this suite" in capsys.readouterr().err


def test_committed_h100_baseline_renders_the_committed_results(tmp_path, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the report names its source as given: relative, as in the docs
    baseline = next(Path("baselines").glob("sm90-*/*/0004_baseline.json"))
    out = tmp_path / "r.md"
    assert main([str(baseline), "-o", str(out)]) == 0
    rows = load_rows(json.loads(baseline.read_text()))
    assert len(rows) == 40
    rendered = out.read_text()
    assert " ".join(rendered.split()).count("| bert-base/torch-compile/hybrid |") == 4
    # docs/results quotes this table: it must be what the report makes of the committed baseline.
    assert rendered == (root / "docs/results/perf-h100-compile/results.md").read_text()
