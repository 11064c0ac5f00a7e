"""The embedded pipeline end to end with the exact threshold segmenter and the shipped encoder and
classifier: results, label map, DICOM SEG and SR (validated by dciodvfy), overview PNG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from discgeo.api import process_study
from discgeo.classification import NarrowingClassifier
from discgeo.cli import main
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.errors import ModelMismatchError
from discgeo.io import read_labels
from discgeo.io.dicom import read_dicom_study
from discgeo.phantom import make_case, write_dicom_series
from discgeo.pipeline import LocalStages
from discgeo.schemas import StudyResult
from discgeo.segmentation import Segmenter


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A phantom whose image shows the discs bright on a dark background, written as DICOM."""
    case = make_case(15, 2, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    folder = tmp_path_factory.mktemp("study") / "dicom"
    write_dicom_series(image, folder)
    return case, folder


def test_embedded_study_results_match_truth(threshold_stages, study, tmp_path):
    case, folder = study
    processed = process_study(folder, stages=threshold_stages, out=tmp_path, study="test")
    result, labels, files = processed.result, processed.labels, processed.files
    sources = read_dicom_study(folder)[1]
    truth = {d["level"]: d for d in case.truth["discs"]}
    assert [d.level for d in result.discs] == list(truth)
    for disc in result.discs:
        # the threshold segmenter works on a 1 mm grid: a 5-7 mm disc seen in 3.5 mm slices gains up to ~1 mm
        assert disc.geometry.mean_height_mm == pytest.approx(truth[disc.level]["mean_height_mm"], abs=1.1)
        assert len(disc.latents) == 4 and 0 <= disc.narrowing_probability <= 1
        assert 0 <= disc.reconstruction_iou <= 1
    assert set(result.timings_s) == {"read", "segment", "measure", "encode", "classify", "total"}
    assert result.model_versions["segmenter"] == "threshold-test"
    assert StudyResult.model_validate_json(files["results"].read_text()) == result
    assert np.array_equal(read_labels(files["labels"]).array, labels.array)
    seg = pydicom.dcmread(files["seg"])
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == len(result.discs)
    assert seg.SegmentSequence[0].SegmentLabel == "L5-S1 intervertebral disc"
    sr = pydicom.dcmread(files["sr"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == sources[0].StudyInstanceUID
    text = str(sr)
    assert "Disc mean height" in text  # every value is checked in tests/unit/test_outputs.py
    from PIL import Image

    from discgeo.io.outputs import DISC_COLOURS

    picture = np.asarray(Image.open(files["overview"]).convert("RGB")).reshape(-1, 3).astype(int)
    for i in range(len(result.discs)):  # each disc's colour is drawn (its leader line and label text)
        assert np.count_nonzero(np.all(picture == DISC_COLOURS[i].astype(int), axis=1)) > 50


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None and os.environ.get("CI") != "true",
    reason="dciodvfy (Debian dicom3tools) not installed; `make system-deps` installs it",
)
def test_dciodvfy_reports_no_errors_on_seg_and_sr(threshold_stages, study, tmp_path):
    _, folder = study
    files = process_study(folder, stages=threshold_stages, out=tmp_path).files
    for name in ("seg", "sr"):
        report = subprocess.run(["dciodvfy", str(files[name])], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors[:5]}"


def test_run_cli_on_a_nifti_batch(
    threshold_stages, tmp_path, capsys, monkeypatch, threshold_segmenter_artifact
):
    from discgeo.io import write_nifti

    monkeypatch.setenv("DISCGEO_SEGMENTER_ARTIFACT", str(threshold_segmenter_artifact))
    for index in range(2):
        case = make_case(16, index, spacing=(3.0, 1.0, 1.0), full_coverage=True)
        image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 700.0 + 60.0)
        write_nifti(image, tmp_path / "in" / f"study{index}.nii.gz")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not an image")
    assert main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "broken.nii.gz" in captured.err
    for index in range(2):
        data = json.loads((tmp_path / "out" / f"study{index}" / "results.json").read_text())
        assert data["discs"][0]["level"] == "L5-S1"
        assert not (tmp_path / "out" / f"study{index}" / "seg.dcm").exists()  # NIfTI input: no DICOM sources


def test_local_stages_refuse_a_classifier_of_another_encoder(threshold_segmenter_artifact):
    settings = Settings.from_env()
    encoder = Encoder.from_artifact(settings.artifact("autoencoder"))
    shipped = NarrowingClassifier.from_artifact(settings.artifact("classifier"))
    assert shipped.metadata["encoder_version"] == encoder.version  # the shipped pair was trained together
    # a classifier that uses latent features refuses the latents of another autoencoder
    classifier = NarrowingClassifier(
        shipped.model, ("latent_0", *shipped.features[1:]), metadata={"encoder_version": "0.0.0-other"}
    )
    assert classifier.encoder_version == "0.0.0-other"
    with pytest.raises(ModelMismatchError, match=f"autoencoder {encoder.version}"):
        LocalStages(
            segmenter=Segmenter.from_artifact(threshold_segmenter_artifact),
            encoder=encoder,
            classifier=classifier,
        )
