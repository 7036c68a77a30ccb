"""The benchmarks: baselines give the seed's exact answers, and each benchmark runs on a tiny grid."""
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package
from benchmarks import baselines, decision_quality, estimation_speed  # noqa: E402

from orchestrator.units import GiB


class LineBed:
    """A card of ``total_gib`` whose seed probe reads 1 GB + 0.5 GB per sample; OOM from ``oom_at``."""

    def __init__(self, total_gib=16, oom_at=None, budget_gib=12.8):
        self.info = SimpleNamespace(total_bytes=total_gib * GiB)
        self.oom_at = oom_at
        self.budget_bytes = budget_gib * GiB

    def resident(self):
        return 0, 0

    def probe_reserved(self, batch):
        if self.oom_at is not None and batch >= self.oom_at:
            return None
        return int((1 + 0.5 * batch) * baselines.GB)

    def fits(self, batch):
        return batch < 40


def test_seed_solves_its_line_in_mixed_units():
    """free 16 GiB x 0.8 against a 1 + 0.5 b (GB) line: batch int(23.6) = 23; ultralytics' 0.6: 17."""
    assert baselines.seed(LineBed()).batch == 23
    assert baselines.ultralytics_style(LineBed()).batch == 17
    assert baselines.ultralytics_style(LineBed()).probes == [1, 2, 4, 8, 16, 32, 64]
    assert baselines.ultralytics_style(LineBed(total_gib=15)).probes == [1, 2, 4, 8, 16]


def test_seed_steps_back_below_a_failed_probe():
    """A fit at or above the first failed size takes the size before it."""
    out = baselines.seed(LineBed(oom_at=8))
    assert out.batch == 4
    assert out.steps == 3 * 3 + 2  # 3 iterations per probe that ran, 1 per probe that failed


def test_seed_defaults_outside_its_safe_range_and_crashes_without_points():
    """Beyond 1024 the seed trains with 16; with every probe failed its fit raises (ultralytics: 16)."""
    assert baselines.seed(LineBed(total_gib=1000)).batch == 16
    assert baselines.seed(LineBed(oom_at=1)).batch is None
    assert baselines.ultralytics_style(LineBed(oom_at=1)).batch == 16


def test_power_keeps_the_last_doubling_that_fits():
    out = baselines.power(LineBed())
    assert (out.batch, out.probes) == (32, [1, 2, 4, 8, 16, 32, 64])


TINY = decision_quality.Grid(models=(("torchvision:resnet18", (224,), "SGD"),), cards=("T4", "A10G"),
                             precisions=("fp16",))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_decision_quality_on_a_tiny_grid(tmp_path):
    """Every algorithm decides every case; the report, summary and case tables have their rows and columns."""
    result = decision_quality.run(TINY)
    md, summary_csv, cases_csv = decision_quality.write(result, tmp_path, "dq", "test")
    summary = _read_csv(summary_csv)
    cases = _read_csv(cases_csv)
    assert [r["algorithm"] for r in summary] == list(baselines.ALGORITHMS)
    assert list(summary[0]) == decision_quality.SUMMARY_COLUMNS
    assert len(cases) == 2 * len(baselines.ALGORITHMS)
    assert list(cases[0]) == decision_quality.CASE_COLUMNS
    ours = [r for r in cases if r["algorithm"] == "ours"]
    assert all(r["over_budget"] == "False" and float(r["ratio"]) >= 0.98 for r in ours)
    text = md.read_text()
    assert "## Summary" in text and "## Acceptance for ours" in text and "| seed |" in text


@pytest.mark.slow
def test_estimation_speed_on_a_tiny_grid(tmp_path):
    """One row per batch with a trace time and a replay time; the report has the flatness table."""
    rows = estimation_speed.run((("torchvision:resnet18", 64),), (1, 8), trace_repeats=1, replay_repeats=1)
    md, csv_path = estimation_speed.write(rows, tmp_path, "es", "test")
    table = _read_csv(csv_path)
    assert [int(r["batch"]) for r in table] == [1, 8]
    assert list(table[0]) == estimation_speed.COLUMNS
    assert all(float(r["trace_s"]) > 0 and float(r["replay_ms"]) > 0 for r in table)
    assert "## Flatness" in md.read_text()


@pytest.mark.slow
def test_sweep_scaling_in_process_and_ray_agree(ray_session, tmp_path):
    """One tiny workload in one process and through a 1-actor Ray sweep: same batch, a row each."""
    from benchmarks import sweep_scaling

    grid = ({"models": ["torchvision:resnet18"], "imgsz": [64]},)
    rows = sweep_scaling.run(grid, (("in-process", "T4"), ("ray", "T4")))
    md, csv_path = sweep_scaling.write(rows, tmp_path, "ss", "test", grid)
    table = _read_csv(csv_path)
    assert [r["runner"] for r in table] == ["in-process", "ray"]
    assert list(table[0]) == sweep_scaling.COLUMNS
    assert table[1]["same_batches"] == "True" and table[1]["profiles"] == "1"
    assert "ray_overhead_s_per_combination" in md.read_text()
