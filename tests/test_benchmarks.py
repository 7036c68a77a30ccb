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

    def __init__(self, total_gib=16, oom_at=None, budget_gib=12.8, fraction=0.8):
        self.info = SimpleNamespace(total_bytes=total_gib * GiB)
        self.oom_at = oom_at
        self.budget_bytes = budget_gib * GiB
        self.fraction = fraction

    def resident(self):
        return 0, 0

    def probe_reserved(self, batch):
        if self.oom_at is not None and batch >= self.oom_at:
            return None
        return int((1 + 0.5 * batch) * baselines.GB)

    def fits(self, batch):
        return batch < 40


def test_seed_solves_its_line_in_mixed_units():
    """free 16 GiB x 0.8 against a 1 + 0.5 b (GB) line: batch int(23.6) = 23, for ultralytics-style too at
    the same fraction; at its own 0.6: 17."""
    assert baselines.seed(LineBed()).batch == 23
    assert baselines.ultralytics_style(LineBed()).batch == 23
    assert baselines.ultralytics_style(LineBed(fraction=baselines.ULTRALYTICS_FRACTION)).batch == 17
    assert baselines.ultralytics_style(LineBed()).probes == [1, 2, 4, 8, 16, 32, 64]
    assert baselines.ultralytics_style(LineBed(total_gib=15)).probes == [1, 2, 4, 8, 16]


def test_seed_steps_back_below_a_failed_probe():
    """A fit at or above the first failed size takes the size before it."""
    out = baselines.seed(LineBed(oom_at=8))
    assert out.batch == 4
    assert (out.passes, out.optimizer_steps) == (3 * 3 + 2, 0)  # 3 passes per probe that ran, 1 per failure
    assert out.passes_cuda == out.passes  # no warm-up


def test_seed_defaults_outside_its_safe_range_and_crashes_without_points():
    """Beyond 1024 the seed trains with 16; with every probe failed its fit raises (ultralytics: 16)."""
    assert baselines.seed(LineBed(total_gib=1000)).batch == 16
    assert baselines.seed(LineBed(oom_at=1)).batch is None
    assert baselines.ultralytics_style(LineBed(oom_at=1)).batch == 16


def test_power_keeps_the_last_doubling_that_fits():
    out = baselines.power(LineBed())
    assert (out.batch, out.probes) == (32, [1, 2, 4, 8, 16, 32, 64])
    assert out.passes == out.optimizer_steps == 2 * 7


def test_ours_on_cuda_adds_the_warm_up_measurement():
    """Ours runs 2 full steps per measurement; on CUDA one more measurement (2 steps) warms up first."""
    bed = LineBed()
    bed.full_step = lambda b: int((1 + 0.5 * b) * baselines.GB)
    out = baselines.ours(bed)
    assert out.passes == out.optimizer_steps == 2 * out.measurements
    assert out.passes_cuda == out.passes + 2


def test_perturbed_card_without_perturbation_is_the_simulated_card(profiles):
    """A perturbed card with 0 spread peaks exactly where the simulated card does (batch 1 is traced, the rest
    synthesized); with per-sample bytes raised, a large batch needs more."""
    from orchestrator.simdevice import SimulatedBackend
    from orchestrator.spec import Workload

    w = Workload(model="torchvision:mobilenet_v3_small", imgsz=224)
    traces = SimpleNamespace(full=profiles(w), workload=w)
    backend = SimulatedBackend("T4")
    backend.add_profile(profiles(w))
    exact = baselines.PerturbedCard(traces, "T4", "case", spread=0.0)
    for b in (1, 2, 3, 100, 700):
        assert exact.peak(b) == backend.measurer(w)(b).reserved_bytes
    assert exact.budget_bytes(0.8) == backend.info().budget_bytes(0.8)
    for text in ("a", "b", "c", "d"):
        card = baselines.PerturbedCard(traces, "T4", text)
        assert all(abs(x - 1) <= 0.03 for x in (card.per_sample, card.context, card.workspace))
        bigger = card.per_sample > 1
        assert (card.peak(700) > exact.peak(700)) == bigger


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
    names = list(baselines.ALGORITHMS) + list(baselines.OWN_DEFAULTS)
    assert [r["algorithm"] for r in summary] == names
    assert list(summary[0]) == decision_quality.SUMMARY_COLUMNS
    assert len(cases) == 2 * len(names)
    assert list(cases[0]) == decision_quality.CASE_COLUMNS
    assert {r["fraction"] for r in cases if r["algorithm"] != "ultralytics-style@0.6"} == {"0.8"}
    ours = [r for r in cases if r["algorithm"] == "ours"]
    assert all(r["over_budget"] == "False" and float(r["ratio"]) >= 0.98 for r in ours)
    assert all(r["perturbation"] and int(r["perturbed_true_batch"]) > 0 for r in cases)
    text = md.read_text()
    assert "## Quality" in text and "## Cost" in text and "## Judged on a perturbed card" in text
    assert "## Acceptance for ours" in text and "| seed |" in text


def test_extrapolation_on_a_tiny_grid(tmp_path, profiles):
    """One workload, two target cards: a row per (card, fraction), every answer judged, both lines summarized."""
    from benchmarks import extrapolation
    from orchestrator.spec import Workload

    setup = extrapolation.Setup(workloads=(Workload(model="torchvision:mobilenet_v3_small", imgsz=224),),
                                targets=("V100-16GB", "L4"), fractions=(0.6, 0.8))
    rows, _ = extrapolation.run(setup, profile=profiles)
    assert [(r["card"], r["fraction"]) for r in rows] == [("V100-16GB", 0.6), ("V100-16GB", 0.8), ("L4", 0.6),
                                                         ("L4", 0.8)]
    assert all(r["fits"] and r["engine_batch"] > 0 for r in rows)
    summary = extrapolation.summarize(rows)
    assert [s["answers"] for s in summary] == ["lookup (upper line)", "least-squares slope"]
    assert list(summary[0]) == extrapolation.SUMMARY_COLUMNS


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


@pytest.mark.slow
def test_table_store_on_a_small_table(tmp_path):
    """150 rows: a row per size with both paths' per-write cost, and the total; the written table is checked
    inside (read and the folded CSV hold every row)."""
    from benchmarks import table_store

    assert table_store.main(["--rows", "150", "--repeats", "1", "--out", str(tmp_path), "--name", "ts"]) == 0
    rows = _read_csv(tmp_path / "ts.csv")
    assert [r["rows_in_table"] for r in rows] == ["100", "150"]
    assert list(rows[0]) == table_store.COLUMNS
    assert all(float(r["rewrite_ms"]) > 0 and float(r["journal_ms_median"]) > 0 for r in rows)
    assert "Total for 150 single-row writes" in (tmp_path / "ts.md").read_text()


def test_prediction_cost_on_a_tiny_workload(profiles):
    """One case per kind of perturbation on a tiny workload: every variant stays within the perturbed card's
    budget and within 2% of its limit; an exact prediction costs 2 measurements, searching from batch 1 more."""
    from benchmarks import prediction_cost
    from orchestrator.spec import Workload

    prof = profiles(Workload(model="tiny_models:tiny", imgsz=256, precision="fp32"))  # T4: 563, not capped
    kinds = {group: (label, f) for group, label, f in prediction_cost.perturbations()}
    rows = [r for group, (label, f) in kinds.items() for r in prediction_cost.run_case(prof, "T4", group, label, f)]
    assert len(rows) == 3 * len(kinds)
    assert not any(r["over_budget"] for r in rows)
    assert all(r["ratio"] >= 0.98 for r in rows)
    exact = {r["algorithm"]: r["measurements"] for r in rows if r["group"] == "exact"}
    assert exact["predicted (catalog)"] == exact["predicted (device)"] == 2 < exact["from batch 1"]
    summary = prediction_cost.summarize(rows)
    assert {s["group"] for s in summary} == set(kinds) and all(s["cases"] == 1 for s in summary)


def test_calibration_reads_each_epoch_as_its_release_does():
    """Epochs of a trace (training, validation, training, validation): epoch 1 is the first training phase;
    a release that empties the cache at each epoch's end reads the second epoch's training after keeping
    validation's cache; one that never empties it reads the high water of both epochs and validation."""
    from benchmarks import calibration

    mib = 2**20
    # weights 30 MiB; epoch 1 uses 40 MiB; validation 60 MiB; epoch 2 uses 40 MiB again
    events = [30 * mib, 40 * mib, -2, 0, 60 * mib, -3, 0, 40 * mib, -4, 0, 60 * mib, -5]
    assert calibration.read_training(events, "epoch1", [], raw=True) == 70 * mib
    # emptied at the epoch's end: epoch 2 starts from the weights' segment alone
    assert calibration.read_training(events, "epochN", [], raw=True) == 70 * mib
    # never emptied: validation's 60 MiB does not fit the cached 40 MiB segment, so both stay reserved
    assert calibration.read_training(events, "epochN_keep", [], raw=True) == 130 * mib
    assert calibration.read_training(events, "epochN_keep", [], raw=False) >= 130 * mib


def test_calibration_simulates_a_published_probe_reading():
    """One AutoBatch profile row (GTX 1080 Ti, yolov8n at 640 px, batch 4: 0.581 GB) simulated as 8.0.x ran
    it: within 10 % of what the card printed, and the table written with it."""
    from benchmarks import calibration

    point = [p for p in calibration.load() if p["id"] == "1080Ti-8n-p4"]
    (row,) = calibration.run(point)
    assert row["real"] == 0.581 and 0.9 < row["ratio"] < 1.1
    assert set(calibration.COLUMNS) <= set(row)
