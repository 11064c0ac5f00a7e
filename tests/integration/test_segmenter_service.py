"""The segmenter service over HTTP, with the exact threshold model (see conftest)."""

from __future__ import annotations

import gzip
import io
import zipfile

import httpx
import nibabel as nib
import numpy as np
import pytest

from discgeo.io.nifti import nifti_to_bytes
from discgeo.local import ROOT, bentoml_service, client_headers
from discgeo.phantom import make_case, write_dicom_series
from discgeo.segmentation import SEGMENTATION_HEADER, SEGMENTATION_META, Segmenter, with_segmentation_header

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def segmenter_home(tmp_path_factory):
    return tmp_path_factory.mktemp("bentoml-segmenter")


@pytest.fixture(scope="module")
def segmenter_url(segmenter_home, threshold_segmenter_artifact):
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    with bentoml_service(
        "service.py:Segmenter", ROOT / "services" / "segmenter", segmenter_home, env=env
    ) as url:
        yield url


@pytest.fixture(scope="module")
def bright_disc_study():
    case = make_case(14, 0, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    return case, image


def _post(url, data, name):
    return httpx.post(
        headers=client_headers(),
        url=url + "/segment",
        files={"volume": (name, data, "application/octet-stream")},
        timeout=300,
    )


def _labels(response) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    return np.asarray(image.dataobj)


def test_nifti_in_labels_out_same_as_in_process(
    segmenter_url, bright_disc_study, threshold_segmenter_artifact
):
    case, image = bright_disc_study
    response = _post(segmenter_url, nifti_to_bytes(image), "study.nii.gz")
    assert response.status_code == 200, response.text
    assert response.headers["x-discgeo-provider"] == "CPUExecutionProvider"
    assert response.headers["x-discgeo-discs"] == str(len(case.truth["discs"]))
    local = Segmenter.from_artifact(threshold_segmenter_artifact).predict(image)
    assert np.array_equal(_labels(response), local.array)
    # how the levels were named and what was dropped travel beside the labels
    told = with_segmentation_header(local.with_array(local.array), response.headers[SEGMENTATION_HEADER])
    assert {k: told.meta[k] for k in SEGMENTATION_META} == {k: local.meta[k] for k in SEGMENTATION_META}
    assert told.meta["levels_from"] == "lowest disc" and told.meta["levels_uncertain"] is False


def test_zipped_dicom_in(segmenter_url, bright_disc_study, tmp_path):
    case, image = bright_disc_study
    files = write_dicom_series(image, tmp_path / "dicom")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for f in files:
            archive.write(f, f.name)
    response = _post(segmenter_url, buffer.getvalue(), "study.zip")
    assert response.status_code == 200, response.text
    labels = _labels(response)
    assert sorted(int(v) for v in np.unique(labels) if v) == [d["label"] for d in case.truth["discs"]]


def test_bad_volume_is_rejected(segmenter_url):
    response = _post(segmenter_url, b"definitely not an image" * 40, "x.bin")
    assert response.status_code == 415 and "not a NIfTI file" in response.text
    empty_zip = io.BytesIO()
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("readme.txt", "no images here")
    response = _post(segmenter_url, empty_zip.getvalue(), "x.zip")
    assert response.status_code == 415 and "DICOM" in response.text


@pytest.mark.parametrize(
    ("array", "spacing", "message"),
    [
        (np.full((8, 80, 80), 100.0, np.float32), 1.0, "constant"),
        (np.ones((1, 1, 1), np.float32), 1.0, "covers 1 x 1 mm"),
        ((np.random.default_rng(0).random((8, 80, 80)) * (1 + 1j)).astype(np.complex64), 1.0, "real numbers"),
    ],
)
def test_degenerate_volumes_are_refused_quietly(segmenter_url, segmenter_home, array, spacing, message):
    import nibabel as nib

    buffer = io.BytesIO()
    image = nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0]))
    buffer.write(image.to_bytes())
    response = _post(segmenter_url, buffer.getvalue(), "x.nii")
    assert response.status_code == 400 and message in response.text, response.text
    # a refused input is logged at INFO, not as an ERROR with a traceback
    assert "Traceback" not in (segmenter_home / "serve.log").read_text()
