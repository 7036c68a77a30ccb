"""The report: a Markdown pivot and a heatmap PNG whose numbers are the CSV's."""
import subprocess
import sys

import pandas as pd
import pytest

from orchestrator import report, table
from orchestrator.simdevice import SimulatedBackend
from orchestrator.engine import decide_on
from orchestrator.spec import SpecError, Workload

CARDS = ("T4", "A10G", "A100-80GB")
WORKLOADS = [Workload(model="torchvision:mobilenet_v3_small", imgsz=224, precision="fp16", optimizer="SGD", ema=True),
             Workload(model="ultralytics:yolov8n.yaml", imgsz=320, precision="fp16", optimizer="SGD", ema=True)]
LABELS = {"T4": "T4 (15 GiB)", "A10G": "A10G (22 GiB)", "A100-80GB": "A100-80GB (79 GiB)"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, profiles):
    """Two workloads on three cards (capped at 1024 as a sweep is), a no-fit row and an error row."""
    rows = []
    for w in WORKLOADS:
        for card in CARDS:
            backend = SimulatedBackend(card)
            backend.add_profile(profiles(w))
            rows.append(table.decision_row(decide_on(backend, w, 0.8)))
    backend = SimulatedBackend("T4")
    backend.add_profile(profiles(WORKLOADS[1]))
    rows.append(table.decision_row(decide_on(backend, WORKLOADS[1], 0.02)))  # no-fit: the context fills it
    rows.append(table.error_row(Workload(model="torchvision:vgg11", imgsz=224), SimulatedBackend("A10G").info(), 0.8,
                                "RuntimeError: boom"))
    path = tmp_path_factory.mktemp("report") / "batch_table.csv"
    table.write_rows(path, rows)
    return path


def markdown_cells(text: str) -> dict[tuple[str, str], str]:
    """(row label, column header) -> cell, from the first Markdown table in ``text``."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = split[0], split[2:]
    return {(row[0], col): value for row in body for col, value in zip(header[1:], row[1:])}


def test_markdown_and_png_match_the_csv(swept, tmp_path):
    """Every CSV row's batch size (or status) is in its cell; failures are listed with their reasons."""
    md_path, png_path = report.write(swept, tmp_path / "out")
    text = md_path.read_text()
    cells = markdown_cells(text)
    csv = pd.read_csv(swept)
    assert len(csv) == len(WORKLOADS) * len(CARDS) + 2
    for _, r in csv.iterrows():
        value = cells[(f"{r['model']} @{r['imgsz']} fraction {r['fraction']:g}", LABELS[r["card"]])]
        expected = f"{r['batch_size']}{'+' if r['clamped'] else ''}" if r["status"] == "ok" else r["status"]
        assert value == expected
    assert "**no-fit**: nothing left" in text and "**error**: RuntimeError: boom" in text
    assert f"![batch sizes]({png_path.name})" in text
    image = png_path.read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 10_000


def test_cli_writes_next_to_the_table_and_prints_the_paths(swept):
    done = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(swept)],
                          capture_output=True, text=True, timeout=120)
    folder = swept.parent / "report"
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(folder / "batch_table.md"), str(folder / "batch_table.png")]


def test_empty_table_says_how_to_build_one(tmp_path):
    with pytest.raises(SpecError, match="has no rows .* orchestrator sweep --out"):
        report.write(tmp_path / "none.csv")


def test_one_pivot_shows_every_varying_key_and_hides_no_row(swept):
    """The sweep's and the report's pivot are one: a second ema value gets its own row, and two rows
    that share a cell (two device names with one label) are both shown, not one hidden."""
    from orchestrator import summary

    df = table.read(swept)
    ok = df[df["status"] == "ok"]
    no_ema = ok.assign(ema=False, batch_size=ok["batch_size"] - 1)
    piv = summary.pivot(pd.concat([ok, no_ema], ignore_index=True))
    assert "ema" in piv.index.names
    assert {summary.row_label(k, list(piv.index.names)).split(" @")[1] for k in piv.index} >= {"224 ema", "224 no ema"}
    twin = ok.iloc[[0]].assign(gpu_name="Tesla T4 (other driver)", batch_size=7)
    cells = summary.pivot(pd.concat([ok, twin], ignore_index=True)).values.ravel().tolist()
    assert any("/" in c and "7" in [x.rstrip("+") for x in c.split("/")] for c in cells), cells
