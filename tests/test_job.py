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
