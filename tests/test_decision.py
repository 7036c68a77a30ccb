"""The pure decision core, against synthetic measure functions."""
import math
import random

import pytest

from orchestrator.decision import OutOfMemory, Prior, decide, fit_line, monotonic

from orchestrator.units import MiB


def line(fixed, per_sample, capacity=None):
    """A device whose step peak is an exact line, OOM above ``capacity`` bytes."""

    def measure(b):
        peak = fixed + per_sample * b
        if capacity is not None and peak > capacity:
            raise OutOfMemory(f"batch {b}")
        return peak

    return measure


def true_max(measure, budget, limit=100_000):
    """Largest b with measure(b) <= budget, by scanning (the ground truth)."""
    best = 0
    for b in range(1, limit):
        try:
            if measure(b) > budget:
                break
        except OutOfMemory:
            break
        best = b
    return best


def test_fit_line_exact():
    """An exact line is recovered with R^2 = 1."""
    fit = fit_line([(1, 110), (2, 120), (4, 140)])
    assert fit.bytes_per_sample == pytest.approx(10)
    assert fit.fixed_bytes == pytest.approx(100)
    assert fit.r2 == pytest.approx(1.0)


def test_monotonic_drops_points_below_an_earlier_peak():
    """A larger batch that reads less memory than a smaller one is dropped, not fitted."""
    assert monotonic([(4, 50), (1, 10), (2, 60), (8, 90)]) == [(1, 10), (2, 60), (8, 90)]


@pytest.mark.parametrize("fixed,per,budget", [
    (500 * MiB, 37 * MiB, 12_000 * MiB),
    (2_000 * MiB, 3 * MiB, 60_000 * MiB),
    (100 * MiB, 900 * MiB, 14_000 * MiB),
    (1_000 * MiB, 80 * MiB, 2_000 * MiB),
])
def test_exact_line_gives_exact_answer(fixed, per, budget):
    """On an exact line the answer is floor((budget - fixed) / per_sample), verified by a measurement."""
    d = decide(line(fixed, per), budget, max_batch=100_000)
    expected = (budget - fixed) // per
    assert d.status == "ok"
    assert d.batch_size == expected
    assert d.peak_bytes == fixed + per * expected <= budget
    assert any(p.batch == expected for p in d.probes)  # the answer itself was run
    assert d.bytes_per_sample == pytest.approx(per)
    assert d.fixed_bytes == pytest.approx(fixed)
    assert d.measurements <= 8


def test_noise_stays_safe_and_close():
    """With +-1% measurement noise the answer is within budget on the measured peak and near the truth."""
    rng = random.Random(0)
    for trial in range(50):
        fixed, per = rng.uniform(200, 3000) * MiB, rng.uniform(5, 400) * MiB
        budget = int(rng.uniform(8_000, 70_000) * MiB)
        noise = {}

        def measure(b):
            noise.setdefault(b, rng.uniform(-0.01, 0.01))
            return int((fixed + per * b) * (1 + noise[b]))

        d = decide(measure, budget, max_batch=100_000)
        assert d.peak_bytes <= budget
        assert all(p.batch > d.batch_size for p in d.probes if p.peak_bytes is None or p.peak_bytes > budget)
        assert d.batch_size >= 0.9 * (budget - fixed) / per


def test_middle_probe_oom_is_never_exceeded():
    """An OOM at batch 4 (a transient or fragmentation) caps the answer below 4 even if 8 would fit."""
    base = line(100 * MiB, 10 * MiB)

    def measure(b):
        if b == 4:
            raise OutOfMemory("fragmented")
        return base(b)

    d = decide(measure, 10_000 * MiB)
    assert d.status == "ok"
    assert d.batch_size == 3
    assert [p.batch for p in d.probes][:3] == [1, 2, 4]


def test_all_oom_is_no_fit():
    """A device where even batch 1 runs out of memory gives status no-fit and batch 0, not a default."""

    def measure(b):
        raise OutOfMemory("always")

    d = decide(measure, 10_000 * MiB)
    assert (d.status, d.batch_size, d.measurements) == ("no-fit", 0, 1)
    assert "out of memory" in d.reason


def test_budget_below_fixed_cost_is_no_fit():
    """When batch 1 already exceeds the budget the answer is no-fit."""
    d = decide(line(5_000 * MiB, 10 * MiB), 4_000 * MiB)
    assert (d.status, d.batch_size) == ("no-fit", 0)
    assert "budget" in d.reason


def test_step_shaped_curve():
    """A jump in memory (e.g. a new allocator segment size) between probes is found by bisection."""

    def measure(b):
        return 1_000 * MiB + (0 if b <= 21 else 6_000 * MiB) + b * MiB

    budget = 4_000 * MiB
    d = decide(measure, budget)
    assert d.batch_size == 21
    assert d.peak_bytes <= budget


def test_piecewise_curve_small_batches_flat():
    """Optimizer-dominated peak at small batches (flat), activations later: answer within 2% and safe."""

    def measure(b):
        return max(3_000 * MiB, 1_000 * MiB + 45 * MiB * b)

    budget = 30_000 * MiB
    d = decide(measure, budget)
    truth = true_max(measure, budget)
    assert truth * 0.98 <= d.batch_size <= truth
    assert d.measurements <= 10


def test_oom_before_budget_backs_off():
    """A device that OOMs below the budget (capacity < budget) is handled by backing off, never above a failure."""
    measure = line(100 * MiB, 20 * MiB, capacity=3_000 * MiB)
    d = decide(measure, 8_000 * MiB)
    truth = true_max(measure, 8_000 * MiB)
    assert truth * 0.98 <= d.batch_size <= truth


def test_clamped_to_max_batch():
    """A tiny workload on a huge budget stops at max_batch and says so."""
    d = decide(line(10 * MiB, 1024), 70_000 * MiB, max_batch=256)
    assert (d.batch_size, d.clamped) == (256, True)
    assert "max_batch=256" in d.reason
    assert max(p.batch for p in d.probes) == 256


def test_other_errors_propagate():
    """Only OutOfMemory is data: any other exception leaves decide() untouched."""

    def measure(b):
        if b == 4:
            raise RuntimeError("shape mismatch")
        return b

    with pytest.raises(RuntimeError, match="shape mismatch"):
        decide(measure, 10_000)


@pytest.mark.parametrize("seed", range(20))
def test_random_lines_within_tolerance(seed):
    """Random lines: never over budget, always >= 98% of the true limit, <= 8 measurements on average."""
    rng = random.Random(seed)
    fixed, per = rng.uniform(100, 5000) * MiB, rng.uniform(0.5, 700) * MiB
    budget = int(rng.uniform(6_000, 130_000) * MiB)
    measure = line(fixed, per)
    d = decide(measure, budget, max_batch=1_000_000)
    truth = math.floor((budget - fixed) / per)
    if truth < 1:
        assert d.status == "no-fit"
        return
    assert 0.98 * truth <= d.batch_size <= truth
    assert d.measurements <= 9


@pytest.mark.parametrize("shape", ["convex", "concave", "steps"])
def test_small_limits_are_exact(shape):
    """Below batch 50, 2% of the limit is less than one batch: the answer is the true limit itself.

    Curved peaks (convex: activations that grow faster than the batch; concave; allocator-like
    steps) make the line miss, so the bracket, not the first prediction, has to settle it.
    """
    curves = {
        "convex": lambda b: 900 * MiB + 40 * MiB * b + 3 * MiB * b * b,
        "concave": lambda b: 900 * MiB + 400 * MiB * b - 3 * MiB * b * b,
        "steps": lambda b: 900 * MiB + 60 * MiB * b + 500 * MiB * (b // 7),
    }
    curve = curves[shape]
    for limit in range(1, 50):
        budget = (curve(limit) + curve(limit + 1)) // 2
        d = decide(curve, budget)
        assert true_max(curve, budget, limit=100) == limit
        assert d.batch_size == limit, (shape, limit, [p.batch for p in d.probes])


# -- starting from a prediction (a Prior): the floor is 2 measurements, and it stays safe when wrong


def test_exact_prior_costs_two_measurements():
    """A right prediction: the predicted batch fits, one just above the tolerance fails, nothing else runs."""
    fixed, per, budget = 700 * MiB, 45 * MiB, 20_000 * MiB
    truth = (budget - fixed) // per
    d = decide(line(fixed, per), budget, prior=Prior(truth, per))
    assert (d.batch_size, d.status) == (truth, "ok")
    assert [p.batch for p in d.probes] == [truth, truth + math.floor(0.02 * truth)]


@pytest.mark.parametrize("seed", range(40))
def test_wrong_priors_stay_safe_and_close(seed):
    """Priors off by up to 50% in batch and slope, on curves the line does not match: never over budget,
    never at or above a failed batch, within 2% of the truth, and no worse than searching from batch 1."""
    rng = random.Random(seed)
    fixed, per, bend = rng.uniform(200, 3000) * MiB, rng.uniform(2, 400) * MiB, rng.choice([0, 0.02, -0.01])
    budget = int(rng.uniform(6_000, 90_000) * MiB)
    capacity = budget / rng.choice([0.8, 0.95])  # the device runs out of memory a little above the budget

    def measure(b):
        peak = fixed + per * b * (1 + bend * math.log(b))
        if peak > capacity:
            raise OutOfMemory(f"batch {b}")
        return int(peak)

    truth = true_max(measure, budget)
    error = rng.uniform(-0.5, 0.5)
    prior = Prior(max(0, round(truth * (1 + error))), per * (1 + rng.uniform(-0.5, 0.5)))
    d = decide(measure, budget, prior=prior, max_batch=100_000)
    assert d.peak_bytes <= budget
    assert all(p.batch > d.batch_size for p in d.probes if p.peak_bytes is None or p.peak_bytes > budget)
    assert 0.98 * truth <= d.batch_size <= truth, [p.batch for p in d.probes]
    assert d.measurements <= decide(measure, budget, max_batch=100_000).measurements


def test_prior_that_predicts_too_much_backs_off_to_no_fit():
    """A prediction far too high on a device where nothing fits ends at batch 1: no-fit, with batch 1's reason."""
    d = decide(line(5_000 * MiB, 10 * MiB), 4_000 * MiB, prior=Prior(300, 10 * MiB))
    assert (d.status, d.batch_size) == ("no-fit", 0)
    assert d.probes[0].batch == 300 and d.probes[-1].batch == 1
    assert "budget" in d.reason


def test_prior_at_max_batch_that_fits_is_one_measurement():
    """A prediction at the cap that fits needs nothing above it: one measurement, clamped."""
    d = decide(line(10 * MiB, 1024), 70_000 * MiB, max_batch=256, prior=Prior(256, 1024))
    assert (d.batch_size, d.clamped, d.measurements) == (256, True, 1)


def test_prior_oom_without_reading_halves():
    """The predicted batch runs out of memory (no reading to aim from): the search steps to 3/4, then brackets."""
    measure = line(100 * MiB, 20 * MiB, capacity=3_000 * MiB)
    d = decide(measure, 8_000 * MiB, prior=Prior(390, 20 * MiB))
    truth = true_max(measure, 8_000 * MiB)
    assert d.probes[1].batch == 292
    assert 0.98 * truth <= d.batch_size <= truth
