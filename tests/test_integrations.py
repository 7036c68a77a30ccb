"""The table inside the trainers: ultralytics, Lightning, accelerate and Ray Train, each run for real on CPU
with the batch read from a table a simulated sweep wrote (the cards are simulated; the trainers are not)."""
import json
import subprocess
import sys
import time

import pytest

from orchestrator import table
from orchestrator.answers import NoAnswer
from orchestrator.datasets import fields_from
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.integrations import min_over_ranks, per_rank_batch
from orchestrator.spec import SpecError, Workload

TINY = Workload(model="tiny_models:tiny", imgsz=256, precision="fp32")  # a CNN the CPU trains in a blink
CARDS = ("T4", "A10G")  # a heterogeneous pair: ranks on different cards must agree on the smaller answer


def row(profiles, workload, card, max_batch=1024):
    backend = SimulatedBackend(card)
    backend.add_profile(profiles(workload))
    return table.decision_row(decide_on(backend, workload, 0.8, max_batch=max_batch))


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory, profiles):
    """TINY on a T4 and an A10G, one process and DDP with 2 ranks."""
    workloads = [TINY, Workload(**{**TINY.as_dict(), "world_size": 2})]
    path = tmp_path_factory.mktemp("integrations") / "batch_table.csv"
    table.write_rows(path, [row(profiles, w, c) for w in workloads for c in CARDS])
    return path


def answer(path, card, world_size=1):
    df = table.read(path)
    hit = df[(df["card"] == card) & (df["world_size"] == world_size)]
    assert len(hit) == 1
    return int(hit["batch_size"].iloc[0])


def test_importing_the_integrations_imports_no_trainer():
    """`import orchestrator.integrations` leaves ultralytics, Lightning, accelerate and Ray Train unimported:
    each is an optional extra, loaded by its own module only."""
    code = ("import sys, orchestrator, orchestrator.integrations; "
            "print([m for m in ('ultralytics', 'lightning', 'pytorch_lightning', 'accelerate', 'ray.train') "
            "if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def test_per_rank_batch_reads_the_row_and_checks_world_size(tiny_table):
    """One process reads its card's row; a world size that is not a positive int is one line naming it."""
    assert [per_rank_batch(tiny_table, TINY.model, 256, gpu=c, precision="fp32") for c in CARDS] == \
        [answer(tiny_table, c) for c in CARDS]
    assert answer(tiny_table, "T4") < answer(tiny_table, "A10G")
    with pytest.raises(SpecError, match=r"world_size=0 must be a positive int"):
        per_rank_batch(tiny_table, TINY.model, 256, gpu="T4", world_size=0)
    assert min_over_ranks(7) == 7  # no process group: its own answer


# -- ultralytics


def make_images(root, count=8, size=64):
    """A detection data set of ``count`` random images, one box each, and its data yaml."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub / "train").mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(root / "images" / "train" / f"{i}.jpg"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        (root / "labels" / "train" / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: ['thing']\n")
    return data


@pytest.mark.slow
def test_ultralytics_trains_one_epoch_with_the_tables_batch(tmp_path, profiles):
    """`batch=-1` with `table_trainer` trains with the table's row for the run's own workload (model, imgsz,
    precision and optimizer from the trainer, objects and classes from its data yaml), not AutoBatch;
    `table_batch` answers the same number; a run the table has no row for stops with NoAnswer's line."""
    from ultralytics import YOLO

    from orchestrator.integrations.ultralytics import model_name, table_batch, table_trainer

    assert [model_name(m) for m in ("yolov8s.yaml", "weights/yolo11n.pt", "ultralytics:yolov8s.yaml")] == \
        ["ultralytics:yolov8s.yaml", "ultralytics:yolo11n.yaml", "ultralytics:yolov8s.yaml"]
    data = make_images(tmp_path / "data")
    # on CPU ultralytics trains without AMP: the fp32 row; max_batch 6 keeps the row small and real (clamped)
    w = Workload(model="ultralytics:yolov8n.yaml", imgsz=64, precision="fp32", **fields_from(data))
    path = tmp_path / "batch_table.csv"
    table.write_rows(path, [row(profiles, w, "T4", max_batch=6)])
    assert table_batch(path, "yolov8n.yaml", 64, gpu="T4", precision="fp32", data=data) == 6
    settings = dict(data=str(data), epochs=1, batch=-1, device="cpu", optimizer="SGD", workers=0, plots=False,
                    val=False, project=str(tmp_path / "runs"), exist_ok=True, verbose=False)
    model = YOLO("yolov8n.yaml")
    model.train(imgsz=64, name="ok", trainer=table_trainer(path, gpu="T4", data=data), **settings)
    assert (model.trainer.batch_size, model.trainer.train_loader.batch_size) == (6, 6)
    assert (tmp_path / "runs" / "ok" / "weights" / "last.pt").exists()  # the epoch ran
    with pytest.raises(NoAnswer, match=r"^imgsz=96 is not in .*: it has imgsz 64;"):
        YOLO("yolov8n.yaml").train(imgsz=96, name="no", trainer=table_trainer(path, gpu="T4", data=data), **settings)


def test_ultralytics_batch_is_global_under_ddp(tiny_table):
    """ultralytics splits `batch` over its ranks: table_batch for 2 ranks is twice the DDP row's per-rank answer."""
    from orchestrator.integrations.ultralytics import table_batch

    per_rank = answer(tiny_table, "T4", world_size=2)
    assert table_batch(tiny_table, TINY.model, 256, gpu="T4", precision="fp32", world_size=2) == 2 * per_rank


# -- Lightning


def lightning_trainer(callbacks, **kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


def test_lightning_callback_sets_the_modules_or_datamodules_batch_size(tiny_table):
    """TableBatchSize sets the module's batch_size (or its datamodule's) in setup, before the dataloader is
    built: the first training batch has the table's size; a module and datamodule without the attribute
    is one line saying what to add."""
    from lightning_ranks import Data, Module

    from orchestrator.integrations.lightning import TableBatchSize

    expected = answer(tiny_table, "T4")
    module = Module()
    callback = TableBatchSize(tiny_table, TINY.model, 256, gpu="T4", precision="fp32")
    lightning_trainer([callback], devices=1).fit(module)
    assert module.seen == [callback.batch_size] == [expected]
    bare, data = Module(), Data()
    del bare.batch_size
    lightning_trainer([TableBatchSize(tiny_table, TINY.model, 256, gpu="T4", precision="fp32")],
                      devices=1).fit(bare, datamodule=data)
    assert (bare.seen, data.batch_size) == ([expected], expected)
    del data.batch_size
    trainer = lightning_trainer([TableBatchSize(tiny_table, TINY.model, 256, gpu="T4", precision="fp32")], devices=1)
    with pytest.raises(SpecError, match=r"Module and its datamodule have no 'batch_size': give one of them"):
        trainer.fit(bare, datamodule=data)


@pytest.mark.slow
def test_lightning_two_processes_agree_on_the_smaller_card(tiny_table, tmp_path):
    """Two DDP processes (ddp_spawn, gloo, CPU) on a T4 and an A10G both train with the T4's DDP answer."""
    from lightning_ranks import CardPerRank, Module, Record

    callbacks = [CardPerRank(CARDS, tiny_table, TINY.model, 256, precision="fp32"), Record(tmp_path)]
    lightning_trainer(callbacks, devices=2, strategy="ddp_spawn").fit(Module())
    expected = answer(tiny_table, "T4", world_size=2)
    assert [json.loads((tmp_path / f"{k}.json").read_text()) for k in (0, 1)] == [[expected], [expected]]


# -- accelerate


def test_accelerate_starts_at_the_tables_answer(tiny_table):
    """find_executable_batch_size's first try is the table's answer; an out-of-memory (the device, faked)
    still steps down as accelerate does."""
    from orchestrator.integrations.accelerate import find_executable_batch_size

    tried = []

    @find_executable_batch_size(tiny_table, TINY.model, 256, gpu="T4", precision="fp32")
    def train(batch_size, label):
        tried.append(batch_size)
        if len(tried) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return label

    assert train("done") == "done"
    first = answer(tiny_table, "T4")
    assert tried == [first, int(first * 0.9)]


# -- Ray Train


def ray_loop(config):
    """Each worker reads the card the test gives its rank (the hardware, faked), twice: on the cards given,
    then with rank 1 on a card the table cannot answer; it writes what each round gave it."""
    import os

    import ray.train

    from orchestrator.integrations.ray_train import worker_batch_size

    rank = ray.train.get_context().get_world_rank()
    got = []
    for cards in (config["cards"], [config["cards"][0], "GTX 480"]):
        try:
            got.append(worker_batch_size(config["table"], "tiny_models:tiny", 256, gpu=cards[rank], precision="fp32"))
        except ValueError as e:
            got.append(str(e))
    with open(os.path.join(config["out"], f"{rank}.json"), "w") as f:
        json.dump(got, f)


@pytest.mark.slow
def test_ray_train_workers_agree_on_the_smaller_card(ray_session, tiny_table, tmp_path):
    """Two Ray Train workers (TorchTrainer, gloo) on a T4 and an A10G both get the T4's answer, from the
    table the driver read and handed them (as on a cluster whose workers cannot read the driver's files).
    When one worker's card has no row, both raise (neither waits forever): it with NoAnswer's line, the
    other saying another rank had none."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(ray_loop, train_loop_config={"table": table.read(tiny_table), "cards": list(CARDS),
                                                        "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                        resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="table"))
    trainer.fit()
    deadline = time.monotonic() + 10  # the session's Ray serves later tests: Ray Train must give its CPUs back
    while ray_session.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == 2
    expected = answer(tiny_table, "T4", world_size=2)
    (first, fails_other), (second, fails_own) = (json.loads((tmp_path / f"{k}.json").read_text()) for k in (0, 1))
    assert first == second == expected < answer(tiny_table, "A10G")  # the A10G rank gave way
    assert fails_own.startswith("gpu='GTX 480' is not a catalog card"), fails_own
    assert fails_other.startswith("another rank has no batch size for tiny_models:tiny"), fails_other
