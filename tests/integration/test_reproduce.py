"""``make reproduce SPIDER=DIR QUICK=1`` end to end on a SPIDER-layout folder built here: phantom
images and masks written as SPIDER-named MetaImage files in SPIDER's label convention, the real SPIDER
mask ``spider-format/masks/1_t1.mha`` among them (with an image rendered from it), and the gradings
and overview rows of SPIDER's own tables (``spider-format/full/``) for those patients."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from discgeo.io import read_labels, write_mha
from discgeo.phantom import make_case
from training.reproduce import read_gradings, read_study_labels, reproduce

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# SPIDER patients with a T1 series: training subset, then validation subset (full/overview.csv)
TRAINING = ("1", "104", "105", "109")  # narrowed: 6 of 7 discs (SPIDER's grades), 3, 2, 2
VALIDATION = ("101", "107")  # 5 of 6, 2 of 8 (one of them IVD label 0)
NO_MASK = "110"  # a series with an image but no mask: reported, left out


def _copy_rows(source: Path, target: Path, keep) -> int:
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if keep(r)]
        fields = reader.fieldnames
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def make_spider_layout(root: Path, spider_format: Path) -> None:
    patients = {*TRAINING, *VALIDATION, NO_MASK}
    root.mkdir(parents=True)
    _copy_rows(
        spider_format / "full" / "overview.csv",
        root / "overview.csv",
        lambda r: r["new_file_name"].split("_")[0] in patients,  # t2 rows too: the loader picks t1
    )
    _copy_rows(
        spider_format / "full" / "radiological_gradings.csv",
        root / "radiological_gradings.csv",
        lambda r: r["Patient"] in patients,
    )
    real = read_labels(spider_format / "masks" / "1_t1.mha")
    write_mha(real, root / "masks" / "1_t1.mha")
    rendered = np.where(real.array > 200, 900, np.where(real.array > 0, 450, 120)).astype(np.int16)
    noise = np.random.default_rng(0).normal(0, 30, rendered.shape)
    write_mha(real.with_array((rendered + noise).astype(np.int16)), root / "images" / "1_t1.mha")
    for index, patient in enumerate(p for p in (*TRAINING, *VALIDATION, NO_MASK) if p != "1"):
        case = make_case(77, index, contrast="t1", spacing=(3.3, 0.9, 0.9), n_discs=7)
        image = case.image.with_array(np.clip(case.image.array, 0, 4000).astype(np.int16))
        write_mha(image, root / "images" / f"{patient}_t1.mha")
        if patient != NO_MASK:
            write_mha(case.labels, root / "masks" / f"{patient}_t1.mha")


def test_make_reproduce_quick_runs_every_step_with_real_numbers(tmp_path, spider_dir, capsys):
    spider = tmp_path / "SPIDER"
    make_spider_layout(spider, spider_dir)
    out = tmp_path / "out"
    command = ["make", "-s", "reproduce", f"SPIDER={spider}", "QUICK=1", f"OUT={out}"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    dataset = results["dataset"]
    assert (dataset["training"], dataset["validation"]) == (len(TRAINING), len(VALIDATION))
    assert f"{NO_MASK}_t1: no mask (masks/{NO_MASK}_t1.mha)" in dataset["problems"]
    assert any(p.startswith("patient 107: IVD label 0 graded") for p in dataset["problems"])  # SPIDER's own

    seg = results["segmentation"]
    assert seg["test_series"] == len(VALIDATION) and seg["discs"] == 7 * len(VALIDATION)
    for metric in ("dice", "iou"):
        estimate, low, high = seg[metric]
        assert 0.0 <= low <= estimate <= high <= 1.0
    assert seg["iou"][0] <= seg["dice"][0]

    (row,) = results["autoencoder"]["sweep"]
    assert row["bottleneck"] == 4 and row["epochs_run"] == 2 and 0.0 < row["train_iou"] < 1.0
    assert results["autoencoder"]["discs"]["held_out"] == 7 * len(VALIDATION)

    geometry = results["geometry"]["levels"]
    assert geometry["L5-S1"]["discs"] == len(TRAINING) + len(VALIDATION)
    assert 3.0 < geometry["L5-S1"]["mean_height_mm"][0] < 20.0

    narrowing = results["narrowing"]
    gradings = read_gradings(spider / "radiological_gradings.csv")
    # every graded disc that its mask has (seven discs each; IVD label 0 matches no mask label)
    graded = {(p, ivd) for p, ivd in gradings if p in {*TRAINING, *VALIDATION} and 1 <= ivd <= 7}
    assert narrowing["discs"] == len(graded)
    assert narrowing["narrowed"] == sum(gradings[k]["narrowing"] for k in graded)
    for protocol in narrowing["protocols"].values():
        for name in ("patient_grouped", "disc_level"):
            assert 0.0 <= protocol[name]["auc"][0] <= 1.0
        leak, low, high = protocol["leakage_auc"]
        assert low <= leak <= high

    report = (out / "report.md").read_text()
    assert "QUICK run" in report and "SPIDER's `Disc narrowing` column" in report
    assert f"{seg['dice'][0]:.3f}" in report  # the table carries this run's figures
    for figure in ("narrowing/roc.png", "narrowing/correlations.png", "narrowing/traversals.png"):
        assert (out / figure).stat().st_size > 1000

    (out / "report.md").unlink()
    reproduce(spider, out, quick=True)  # resumed: every step read, nothing redone
    assert capsys.readouterr().out.count("done before") == 5 and (out / "report.md").is_file()


def test_study_labels_from_csv_and_xlsx(tmp_path):
    import openpyxl

    rows = [
        ("Subject", "IVD number", "Level", "Pfirrmann", "Narrowing"),
        (1, 1, "L5-S1", 3, 0),
        (1, 7, "T11-T12", 2, 1),
    ]
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.save(tmp_path / "labels.xlsx")
    expected = {("1", 1): 0, ("1", 7): 1}
    assert read_study_labels(tmp_path / "labels.csv") == expected
    assert read_study_labels(tmp_path / "labels.xlsx") == expected
