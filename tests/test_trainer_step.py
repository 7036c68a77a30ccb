"""The measured step is the trainer's: YOLO's real loss in the simulated trace, objects, classes, validation,
accumulation and data sets, each checked against a real CPU run of the same step or against the files."""
import pytest

from orchestrator import job, models, simulated, table
from orchestrator.datasets import fields_from
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.spec import SpecError, Workload

YOLO = "ultralytics:yolov8n.yaml"


def phase_peaks(w: Workload, batch: int, *, fake: bool) -> list[int]:
    """Tensor peak of the training steps and of the validation pass; the real run uses YOLO's real loss
    and the real grad scaler, the fake one the simulator's splice."""
    return simulated.phase_tensor_peaks(simulated.trace(models.build(w), w, batch, fake=fake))


@pytest.mark.parametrize("precision,objects", [("fp32", 8), ("fp16", 100)])
def test_simulated_step_equals_real_cpu_run_with_yolos_loss(precision, objects):
    """Training and validation peaks of the simulated step (fake tensors, YOLO's loss spliced in) equal a
    real CPU run of the trainer's step (real v8DetectionLoss, real GradScaler) within 2% (measured: 0.2%)."""
    w = Workload(model=YOLO, imgsz=128, objects=objects, classes=3, precision=precision)
    fake, real = phase_peaks(w, 2, fake=True), phase_peaks(w, 2, fake=False)
    assert len(fake) == len(real) == 2  # training, then validation
    for f, r in zip(fake, real):
        assert abs(f / r - 1) <= 0.02, (fake, real)


def test_more_objects_more_memory_and_a_smaller_answer():
    """Objects per image grow YOLO's loss (the assigner's batch x objects x anchors tensors): the real CPU
    step says by how much, the simulated step agrees, and the answer on a card shrinks with it."""
    few, many = (Workload(model=YOLO, imgsz=256, objects=n, nbs=1, val_scale=0) for n in (8, 400))
    backends = [SimulatedBackend("T4") for _ in (few, many)]
    answers = [decide_on(b, w, 0.3).decision.batch_size for b, w in zip(backends, (few, many))]
    fake = [simulated.tensor_peak(b.profile(w).events(2)) for b, w in zip(backends, (few, many))]
    real = [phase_peaks(w, 2, fake=False)[0] for w in (few, many)]
    assert real[1] > 1.05 * real[0]  # 400 boxes per image cost more than 5% at batch 2
    assert abs((fake[1] - fake[0]) / (real[1] - real[0]) - 1) <= 0.05, (fake, real)
    assert answers[1] < answers[0], answers


def test_classes_set_the_heads_width():
    """classes=3 builds a 3-class YOLO head and classifier; 0 keeps the model's own (80, 1000)."""
    assert models.build(Workload(model=YOLO, classes=3)).module.model[-1].nc == 3
    assert models.build(Workload(model=YOLO)).module.model[-1].nc == 80
    resnet = models.build(Workload(model="torchvision:resnet18", classes=3)).module
    assert resnet.fc.out_features == 3


def test_validation_is_in_the_answer_and_the_row():
    """The answer fits training and validation; the row records the validation peak, below the step's."""
    w = Workload(model="torchvision:mobilenet_v3_small", imgsz=96, val_scale=8, nbs=1)
    r = decide_on(SimulatedBackend("T4"), w, 0.5)
    row = table.decision_row(r)
    assert 0 < row["val_peak_bytes"] <= row["peak_bytes"] <= row["budget_bytes"]
    without = decide_on(SimulatedBackend("T4"), Workload(model=w.model, imgsz=96, val_scale=0, nbs=1), 0.5)
    assert without.val_peak_bytes is None
    assert r.decision.batch_size <= without.decision.batch_size


def make_dataset(root, boxes_per_image, names):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i, n in enumerate(boxes_per_image):
        (root / "images" / "train" / f"{i}.jpg").write_bytes(b"")
        if n is not None:
            lines = [f"{k % len(names)} 0.5 0.5 0.1 0.1" for k in range(n)]
            (root / "labels" / "train" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/train\nnames: {list(names)}\n")
    return data


def test_dataset_gives_four_times_the_busiest_image_and_its_classes(tmp_path):
    """A data yaml: objects = 4 x the most labels on one image (mosaic), classes = its names; an image
    without a label file is background. In a job file and as flags alike."""
    data = make_dataset(tmp_path, [3, 7, None, 1], ["cat", "dog", "bird"])
    assert fields_from(data) == {"objects": 28, "classes": 3}
    j = job.from_dict({"sweep": {"models": [YOLO], "imgsz": [320], "data": str(data)}}, "j.toml")
    assert [(w.objects, w.classes) for w in j.sweep.workloads()] == [(28, 3)]
    with pytest.raises(SpecError, match="sets objects and classes; leave out objects"):
        job.from_dict({"sweep": {"models": [YOLO], "data": str(data), "objects": 5}}, "j.toml")
    with pytest.raises(SpecError, match="does not exist"):
        fields_from(tmp_path / "nope.yaml")


def test_a_data_yaml_that_is_not_yaml_is_one_line_with_the_file_and_the_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [images\nnames: {\n")
    with pytest.raises(SpecError) as e:
        fields_from(bad)
    assert "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(f"data='{bad}' is not valid YAML (") and "at line 2, column" in str(e.value)


LABEL_CASES = {  # label file text -> does ultralytics' loader keep the image (else: drops it as corrupt)
    "0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n": True,
    "0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n": True,  # a polygon (segment data): one box
    "0 0.5 oops 0.1 0.1\n": False,
    "0 0.5 0.5 0.1 0.1 7\n": False,  # 6 columns
    "2 0.5 0.5 0.1 0.1\n": False,  # class 2 of 2 names
    "0 1.5 0.5 0.1 0.1\n": False,  # not normalized
    "0 0.5 0.5 -0.1 0.1\n": False,
    "0.5 0.5 0.5 0.1 0.1\n": False,  # class not an integer
    "0 0.5 0.5 0.1 0.1\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n": False,  # boxes and polygons mixed
}


@pytest.mark.parametrize("text", list(LABEL_CASES), ids=range(len(LABEL_CASES)))
def test_a_label_file_ultralytics_drops_as_corrupt_counts_nothing_and_is_named(tmp_path, caplog, text):
    """Each label file is judged as ultralytics' own loader (``verify_image_label``, run here on the same
    file) judges it: kept, its lines count; dropped as corrupt, it counts 0 and a warning names it."""
    from PIL import Image
    from ultralytics.data.utils import verify_image_label

    data = make_dataset(tmp_path, [1, 1], ["cat", "dog"])
    image, label = tmp_path / "images" / "train" / "0.jpg", tmp_path / "labels" / "train" / "0.txt"
    Image.new("RGB", (32, 32)).save(image)
    label.write_text(text * 3)  # more lines than the other image's one: counted, they would set objects
    corrupt = verify_image_label((str(image), str(label), "", False, 2, 0, 0, False))[8]
    assert corrupt == (not LABEL_CASES[text])  # the table above is what ultralytics does
    with caplog.at_level("WARNING", logger="orchestrator.datasets"):
        fields = fields_from(data)
    lines = 3 * len(text.splitlines())
    assert fields == {"objects": 4 * (1 if corrupt else lines), "classes": 2}
    named = [r.getMessage() for r in caplog.records if str(label) in r.getMessage()]
    assert len(named) == corrupt and all("corrupt" in m for m in named), caplog.text
