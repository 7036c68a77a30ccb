"""Reading the table: measured rows as measured, safe answers for cards never measured, errors that say what exists."""
import subprocess
import sys

import pytest

from orchestrator import cli, table
from orchestrator.simdevice import SimulatedBackend
from orchestrator.cuda import cuda_count
from orchestrator.engine import decide_on
from orchestrator import lookup
from orchestrator.answers import NoAnswer
from orchestrator.spec import SpecError, Workload
from orchestrator.units import GiB

SWEPT = ("T4", "A10G", "A100-80GB")  # the default sweep's simulated fleet
WORKLOADS = {  # the same workloads test_simulated traces: the session's profiles serve both
    "mobilenet": Workload(model="torchvision:mobilenet_v3_small", imgsz=224, precision="fp16", optimizer="SGD", ema=True),
    "yolo": Workload(model="ultralytics:yolov8n.yaml", imgsz=320, precision="fp16", optimizer="SGD", ema=True),
}
UNCAPPED = 10**6  # lookups that should not stop at max_batch
MAX_BATCH = 1024  # what sweeps and lookups cap at by default


def decided(profiles, workload, card, fraction=0.8, max_batch=MAX_BATCH):
    """(backend, engine result) for ``workload`` on a simulated ``card``, replaying the session's traces."""
    backend = SimulatedBackend(card)
    backend.add_profile(profiles(workload))
    return backend, decide_on(backend, workload, fraction, max_batch=max_batch)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, profiles):
    """A table as a sweep writes it: every workload on every card of SWEPT, at fraction 0.8, capped at 1024
    (so a small workload's probes on a large card stop at 1024, far below its limit)."""
    rows = [table.decision_row(decided(profiles, w, c)[1]) for w in WORKLOADS.values() for c in SWEPT]
    path = tmp_path_factory.mktemp("lookup") / "batch_table.csv"
    table.write_rows(path, rows)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator", "lookup", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_every_ok_row_is_answered_as_measured(swept):
    """For every ok row, lookup by catalog key and by device name returns that row's batch size."""
    df = table.read(swept)
    assert (df["status"] == "ok").all() and len(df) == len(WORKLOADS) * len(SWEPT)
    for _, r in df.iterrows():
        for gpu in (r["card"], r["gpu_name"]):
            a = lookup(swept, r["model"], r["imgsz"], gpu, precision=r["precision"], optimizer=r["optimizer"],
                       ema=r["ema"])
            assert (a.batch_size, a.extrapolated, a.gpu_name) == (r["batch_size"], False, r["gpu_name"])


@pytest.mark.parametrize("left_out", ["A10G", "V100-16GB", "A100-40GB", "H200"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_extrapolation_fits_and_is_near_the_measured_limit(swept, profiles, name, left_out):
    """A card no row measured gets a batch that fits its budget and is within 5% below the engine's answer
    there (benchmarks/extrapolation: worst 3.4% below over 96 cases). It can be a little above: the engine
    stops within 2% of the limit, and what fits is at most the limit."""
    w = WORKLOADS[name]
    df = table.read(swept)
    df = df[df["card"] != left_out]
    a = lookup(df, w.model, w.imgsz, left_out)
    backend, truth = decided(profiles, w, left_out)
    assert a.extrapolated
    assert backend.measurer(w)(a.batch_size).reserved_bytes <= backend.info().budget_bytes(0.8)
    assert 0.95 <= a.batch_size / truth.decision.batch_size <= 1 / 0.98, (a.batch_size, truth.decision.batch_size)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_extrapolation_line_lies_on_or_above_every_probe(swept, name):
    """The line an extrapolation solves is drawn above every probe near the top of each card's curve,
    not through them: a least-squares line leaves about half of them above it, where the real curve
    needs more memory than the line says."""
    from orchestrator import answers

    w = WORKLOADS[name]
    points = answers.probe_points(answers.workload_rows(table.read(swept), w, "the table"))
    line = answers.upper_line(points)
    assert line.points == len(points) >= len(SWEPT)
    above = [(b, p - (line.fixed_bytes + line.bytes_per_sample * b)) for b, p in points]
    assert max(excess for _, excess in above) <= 1e-9 * max(p for _, p in points), above
    assert min(excess for _, excess in above) <= 0  # it touches (or passes just above) the probes


def test_another_fraction_is_recomputed(swept, profiles):
    """A fraction the table does not hold is answered from the probes, flagged, and fits that budget."""
    w = WORKLOADS["yolo"]
    a = lookup(swept, w.model, w.imgsz, "T4", fraction=0.6)
    backend, truth = decided(profiles, w, "T4", fraction=0.6)
    assert a.extrapolated and a.fraction == 0.6
    assert backend.measurer(w)(a.batch_size).reserved_bytes <= backend.info().budget_bytes(0.6)
    assert 0.9 <= a.batch_size / truth.decision.batch_size <= 1.0


def test_memory_sizes_name_a_card(swept):
    """A bare size (float or string) is one card; exact GiB ("24GiB") and int bytes another; both
    extrapolated; extrapolations stop at max_batch."""
    w = WORKLOADS["yolo"]
    sold = {lookup(swept, w.model, w.imgsz, gpu) for gpu in (24.0, "24")}
    exact = {lookup(swept, w.model, w.imgsz, gpu) for gpu in (24 * GiB, "24GiB")}
    assert len(sold) == 1 and len(exact) == 1
    sold, exact = sold.pop(), exact.pop()
    assert sold.extrapolated and exact.extrapolated
    assert sold.batch_size < exact.batch_size  # 24 GB as sold is 21.96 GiB on an A10G, not 24 GiB
    assert lookup(swept, WORKLOADS["mobilenet"].model, 224, "H200").batch_size == 1024


@pytest.mark.parametrize("card", SWEPT)
def test_gpu_memory_as_sold_never_above_a_card_of_that_size(swept, card):
    """`--gpu-memory N` with the size a card is sold as (16 for a T4, 24 for an A10G, 80 for an A100-80GB)
    never answers above what that card measured: users type the advertised size, the driver reports less."""
    from orchestrator import catalog

    sold_gb = catalog.card(card).sold_gb
    for w in WORKLOADS.values():
        measured = lookup(swept, w, gpu=card)
        capped = measured.batch_size == MAX_BATCH  # the row says only "at least MAX_BATCH": compare capped
        by_size = lookup(swept, w, gpu=float(sold_gb), max_batch=MAX_BATCH if capped else UNCAPPED)
        assert not measured.extrapolated and by_size.extrapolated
        assert by_size.batch_size <= measured.batch_size, (w.label(), card, by_size.batch_size, measured.batch_size)
    done = run_cli(swept, "--model", WORKLOADS["yolo"].model, "--imgsz", WORKLOADS["yolo"].imgsz,
                   "--gpu-memory", sold_gb)
    assert done.returncode == 0 and int(done.stdout) <= lookup(swept, WORKLOADS["yolo"], gpu=card).batch_size


def test_measured_only_refuses_to_extrapolate(swept):
    """--measured-only: a card the table did not measure is exit 2 with one line, not an extrapolation."""
    w = WORKLOADS["yolo"]
    with pytest.raises(NoAnswer, match="was not measured on H100-80GB .* drop --measured-only"):
        lookup(swept, w, gpu="H100-80GB", measured_only=True)
    assert lookup(swept, w, gpu="A10G", measured_only=True).extrapolated is False
    done = run_cli(swept, "--model", w.model, "--imgsz", w.imgsz, "--gpu", "H100-80GB", "--measured-only")
    assert (done.returncode, done.stdout, len(done.stderr.strip().splitlines())) == (2, "", 1), done.stderr


def test_small_int_is_not_taken_for_bytes(swept):
    with pytest.raises(SpecError, match=r"gpu=24 is read as bytes.*gpu=24\.0"):
        lookup(swept, WORKLOADS["yolo"].model, 320, 24)


def test_no_fit_and_error_rows_are_not_answers(tmp_path, profiles):
    """A no-fit or error row raises with its reason; batch 0 is never returned."""
    w = WORKLOADS["yolo"]
    no_fit = decided(profiles, w, "T4", fraction=0.02)[1]  # nothing left after the CUDA context
    assert no_fit.decision.status == "no-fit"
    broken = Workload(model="torchvision:vgg11", imgsz=224)
    path = tmp_path / "t.csv"
    table.write_rows(path, [table.decision_row(no_fit),
                            table.error_row(broken, SimulatedBackend("A10G").info(), 0.8, "RuntimeError: boom")])
    with pytest.raises(NoAnswer, match="does not fit on Tesla T4 .* fraction 0.02 .*nothing left"):
        lookup(path, w.model, w.imgsz, "T4")
    with pytest.raises(NoAnswer, match="failed to measure on NVIDIA A10G .*RuntimeError: boom"):
        lookup(path, broken.model, 224, "A10G")
    with pytest.raises(NoAnswer, match="no usable measurement to extrapolate from"):
        lookup(path, broken.model, 224, "T4")


@pytest.mark.skipif(cuda_count() > 0, reason="this machine has a CUDA device: gpu=None would use it")
def test_current_device_without_cuda_says_pass_gpu(swept):
    with pytest.raises(SpecError, match="has none: pass gpu="):
        lookup(swept, WORKLOADS["yolo"].model, 320)


def test_cli_prints_only_the_integer(swept):
    """stdout is the batch size alone (for `batch=$(...)`); the explanation goes to stderr."""
    r = table.read(swept).iloc[0]
    done = run_cli(swept, "--model", r["model"], "--imgsz", r["imgsz"], "--gpu", r["card"])
    assert (done.returncode, done.stdout) == (0, f"{r['batch_size']}\n")
    assert f"measured on {r['gpu_name']}" in done.stderr


def test_cli_warns_when_extrapolated(swept, capsys):
    """In-process (the same main() as `python -m orchestrator`): the warning and the reasoning go to stderr."""
    assert cli.main(["lookup", str(swept), "--model", WORKLOADS["yolo"].model, "--imgsz", "320",
                     "--gpu-memory", "24"]) == 0
    out, err = capsys.readouterr()
    assert int(out) > 0 and out.strip().isdigit()
    assert "warning: extrapolated" in err and "EXTRAPOLATED for a 24 GB card (21.96 GiB)" in err


@pytest.mark.parametrize("flags,missing,existing", [
    (["--model", "torchvision:resnet999", "--imgsz", 224, "--gpu", "T4"], "model='torchvision:resnet999'",
     "torchvision:mobilenet_v3_small"),
    (["--model", "ultralytics:yolov8n.yaml", "--imgsz", 640, "--gpu", "T4"], "imgsz=640", "it has imgsz 320"),
    (["--model", "ultralytics:yolov8n.yaml", "--imgsz", 320, "--gpu", "RTX-9999"], "gpu='RTX-9999'",
     "NVIDIA A100-SXM4-80GB"),
])
def test_cli_missing_key_is_one_line_and_exit_2(swept, flags, missing, existing):
    """Nothing on stdout; one stderr line naming what is missing and what the table has."""
    done = run_cli(swept, *flags)
    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and existing in lines[0], done.stderr


def test_cli_gpus_names_an_unknown_card(swept, capsys):
    """`--gpus "NoSuchCard x2"`: the one line names the card and how to give one, not the world size
    (2, from the count) the user never typed."""
    code = cli.main(["lookup", str(swept), "--model", WORKLOADS["yolo"].model, "--imgsz", "320",
                     "--gpus", "NoSuchCard x2"])
    out, err = capsys.readouterr()
    assert (code, out, len(err.splitlines())) == (2, "", 1), err
    assert err.startswith("error: gpus='NoSuchCard x2': gpu='NoSuchCard' is not a catalog card") and "'24 x2'" in err
    assert "world_size" not in err


def test_lookup_returns_every_ok_row_of_the_default_sweep(default_table):
    """The table the shipped default job makes: lookup gives back each ok row's batch size, exactly."""
    _, _, df = default_table
    ok = df[df["status"] == "ok"]
    assert len(ok) >= 24
    for _, r in ok.iterrows():
        for gpu in (r["card"], r["gpu_name"]):
            a = lookup(df, r["model"], int(r["imgsz"]), gpu=gpu, precision=r["precision"],
                       optimizer=r["optimizer"])
            assert (a.batch_size, a.extrapolated) == (int(r["batch_size"]), False)
