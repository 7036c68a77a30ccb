"""Job files: the shipped ones load; bad ones fail with file, key, value and what is allowed."""
from pathlib import Path

import pytest

from orchestrator import job
from orchestrator.spec import SpecError

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.toml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_jobs_load(path):
    j = job.load(path)
    assert j.sweep.workloads()
    assert 0 < j.sweep.fraction <= 1


def test_builtin_default_is_quickstart():
    """No JOB means jobs/quickstart.toml: YOLO and torchvision models, >= 3 simulated card types."""
    j = job.load(None)
    models = {w.model.split(":")[0] for w in j.sweep.workloads()}
    assert {"ultralytics", "torchvision"} <= models
    assert len(j.fleet.simulate) >= 3
    assert j.sweep.out == "results/batch_table.csv"


def test_parse_fleet_counts():
    assert job.parse_fleet("T4 x2, a100-80gb,H100-80GB*3") == (("T4", 2), ("A100-80GB", 1), ("H100-80GB", 3))


def write(tmp_path, text):
    p = tmp_path / "j.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,match", [
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nfracton = 0.5\n', r"j.toml: \[sweep\] unknown key 'fracton'; allowed: .*fraction"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nfraction = 1.3\n', r"\[sweep\] fraction=1.3 must be in \(0, 1\]"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nimgsz = "big"\n', r"imgsz entry 'big' must be a int"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nimgsz = [0]\n', r"imgsz=0 must be a positive"),
    ('[sweep]\nmodels = []\n', r"models=\[\] must be a non-empty list"),
    ('[sweep]\nmodels = ["resnet18"]\n', r"must be SOURCE:NAME"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nprecision = ["fp8"]\n', r"\[sweep\] precision='fp8' must be one of fp32, fp16, bf16"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\nema = "yes"\n', r"ema='yes' must be a bool"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\n[fleet]\nsimulate = "T4, Z9"\n', r"unknown GPU 'Z9': known cards are"),
    ('[sweep]\nmodels = ["torchvision:resnet18"]\n[fleet]\nmode = "cloud"\n', r"mode='cloud' must be auto, real or simulate"),
    ('[sweep\nmodels = 1\n', r"not valid TOML"),
    ('[jobs]\n', r"unknown key 'jobs'"),
])
def test_bad_job_files(tmp_path, text, match):
    with pytest.raises(SpecError, match=match):
        job.load(write(tmp_path, text))


def test_flags_override_the_file():
    j = job.with_overrides(job.load(None), models=["torchvision:resnet18"], imgsz=[128], fraction=0.5,
                           simulate="T4 x2", out="x.csv")
    assert [(w.model, w.imgsz) for w in j.sweep.workloads()] == [("torchvision:resnet18", 128)]
    assert (j.sweep.fraction, j.sweep.out, j.fleet.mode, j.fleet.simulate) == (0.5, "x.csv", "simulate", (("T4", 2),))


def test_a_job_with_only_a_fleet_serves_devices_and_sweep_with_models(tmp_path):
    """`devices` needs only [fleet]; `sweep` takes its models (and sizes) from the flags: the job loads, and
    only a sweep left without models is refused (``require_models``, which the CLI and run_sweep call)."""
    path = write(tmp_path, '[fleet]\nmode = "simulate"\nsimulate = "T4 x2"\n')
    j = job.load(path)
    assert j.fleet.simulate == (("T4", 2),) and j.sweep.workloads() == []
    with pytest.raises(SpecError, match=r"j.toml: \[sweep\] names no models: .*or pass --models"):
        job.require_models(j)
    flagged = job.require_models(job.with_overrides(j, models=["tiny_models:tiny"]))
    assert [(w.model, w.imgsz) for w in flagged.sweep.workloads()] == [("tiny_models:tiny", 640)]
    sized = job.with_overrides(job.load(write(tmp_path, '[sweep]\nimgsz = [320]\n[fleet]\nmode = "simulate"\n')),
                               models=["tiny_models:tiny"])
    assert [w.imgsz for w in sized.sweep.workloads()] == [320]
    with pytest.raises(SpecError, match=r"j.toml: \[fleet\] simulate: 'T4 x-1' count must be >= 1"):
        job.load(write(tmp_path, '[fleet]\nsimulate = "T4 x-1"\n'))


def test_data_in_a_job_file_is_read_from_its_folder_and_errors_name_the_file(tmp_path, monkeypatch):
    """``data`` relative to the job file's folder, whatever the current directory; a missing one names the
    job file, [sweep] and where it was looked for."""
    from test_trainer_step import make_dataset

    folder = tmp_path / "jobs"
    folder.mkdir()
    make_dataset(folder / "ds", [2, 5], ["a", "b"])
    (folder / "j.toml").write_text('[sweep]\nmodels = ["ultralytics:yolov8n.yaml"]\ndata = "ds/data.yaml"\n')
    monkeypatch.chdir(tmp_path)  # not the job file's folder
    assert [(w.objects, w.classes) for w in job.load("jobs/j.toml").sweep.workloads()] == [(20, 2)]
    (folder / "j.toml").write_text('[sweep]\nmodels = ["ultralytics:yolov8n.yaml"]\ndata = "no_such_data.yaml"\n')
    with pytest.raises(SpecError, match=r"^jobs/j.toml: \[sweep\] data='no_such_data.yaml' \(read from '"
                                        + str(folder / "no_such_data.yaml") + r"'\) does not exist"):
        job.load("jobs/j.toml")
