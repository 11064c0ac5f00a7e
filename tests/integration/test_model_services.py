"""Encoder and classifier services as real ``bentoml serve`` processes, against the shipped artifacts."""

from __future__ import annotations

import concurrent.futures
import urllib.request

import httpx
import numpy as np
import pytest

from discgeo.classification import NarrowingClassifier
from discgeo.config import Settings
from discgeo.encoding import Encoder, pack_crops
from discgeo.io import read_labels
from discgeo.io.nifti import nifti_to_bytes
from discgeo.local import ROOT, bentoml_service, client_headers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder_url(tmp_path_factory):
    with bentoml_service(
        "service.py:Encoder", ROOT / "services" / "encoder", tmp_path_factory.mktemp("bentoml-encoder")
    ) as url:
        yield url


@pytest.fixture(scope="module")
def classifier_url(tmp_path_factory):
    with bentoml_service(
        "service.py:Classifier",
        ROOT / "services" / "classifier",
        tmp_path_factory.mktemp("bentoml-classifier"),
    ) as url:
        yield url


def _encode(url: str, data: bytes) -> httpx.Response:
    return httpx.post(
        headers=client_headers(),
        url=url + "/encode",
        files={"crops": ("crops.npz", data, "application/octet-stream")},
        timeout=120,
    )


@pytest.fixture(scope="module")
def local_encoder() -> Encoder:
    return Encoder.from_artifact(Settings.from_env().artifact("autoencoder"))


def test_encoder_over_http_matches_in_process(encoder_url, ivd_dir, local_encoder):
    labels = read_labels(ivd_dir / "case-20_discs.nii.gz")
    crops = local_encoder.crop(labels).crops
    response = _encode(encoder_url, pack_crops(crops))
    assert response.status_code == 200, response.text
    body = response.json()
    latents, quality = local_encoder.encode_with_quality(crops)
    assert np.allclose(body["latents"], latents, atol=1e-4)
    assert np.allclose(body["reconstruction_iou"], quality, atol=1e-6)
    assert body["unusual_shape"] == [local_encoder.is_unusual(float(q)) for q in quality]
    assert body["model_version"] == local_encoder.version and body["provider"] == "CPUExecutionProvider"
    # the pipeline's path: the service crops the label map as its artifact prescribes
    discs = httpx.post(
        headers=client_headers(),
        url=encoder_url + "/encode_discs",
        files={"labels": ("labels.nii.gz", nifti_to_bytes(labels), "application/gzip")},
        timeout=120,
    )
    assert discs.status_code == 200, discs.text
    by_discs = discs.json()
    assert by_discs["levels"] == ["L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2"] and by_discs["too_large"] == []
    assert np.allclose(by_discs["latents"], latents, atol=1e-4)
    bad = httpx.post(
        headers=client_headers(),
        url=encoder_url + "/encode_discs",
        files={"labels": ("labels.nii.gz", b"junk", "application/gzip")},
    )
    assert 400 <= bad.status_code < 500, bad.text


def test_encoder_concurrent_requests_are_batched(encoder_url, ivd_dir, local_encoder):
    crops = local_encoder.crop(read_labels(ivd_dir / "case-11_discs.nii.gz")).crops
    payloads = [pack_crops(crops[i % 5 : i % 5 + 1]) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: _encode(encoder_url, p), payloads))
    assert [r.status_code for r in responses] == [200] * 16, [
        r.text[:300] for r in responses if r.status_code != 200
    ]
    with urllib.request.urlopen(encoder_url + "/metrics") as metrics:
        text = metrics.read().decode()
    sums = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("bentoml_service_adaptive_batch_size_sum")
    ]
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("bentoml_service_adaptive_batch_size_count")
    ]
    assert sum(counts) >= 1 and sum(sums) / sum(counts) > 1.0  # requests were merged into batches
    first = [r.json()["latents"][0] for r in responses[:5]]
    again = [r.json()["latents"][0] for r in responses[5:10]]
    assert np.allclose(first, again, atol=1e-4)  # batching does not change results


@pytest.mark.parametrize(("payload", "status"), [(b"junk", 415), ("many", 413), ("shape", 400)])
def test_encoder_rejects_bad_crops(encoder_url, payload, status):
    import io

    if payload == "many":
        payload = pack_crops(np.zeros((300, 64, 64, 64), np.uint8))
    elif payload == "shape":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, packed=np.zeros((2, 32, 32, 4), np.uint8), count=np.array(2))
        payload = buffer.getvalue()
    response = _encode(encoder_url, payload)
    assert response.status_code == status, response.text


def test_classifier_over_http(classifier_url):
    local = NarrowingClassifier.from_artifact(Settings.from_env().artifact("classifier"))
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, len(local.features)))
    rows[:, local.features.index("height_vs_level")] = [0.5, 1.0, 1.3]
    response = httpx.post(
        headers=client_headers(), url=classifier_url + "/predict", json={"rows": rows.tolist()}, timeout=30
    )
    assert response.status_code == 200, response.text
    body = response.json()
    p, labels = local.predict(rows)
    assert np.allclose(body["probabilities"], p) and body["labels"] == labels.tolist()
    assert body["model_version"] == local.version and body["features"] == list(local.features)
    by_name = [dict(zip(local.features, row, strict=True)) for row in rows.tolist()]
    again = httpx.post(
        headers=client_headers(), url=classifier_url + "/predict", json={"discs": by_name}, timeout=30
    ).json()
    assert np.allclose(again["probabilities"], p)
    # latents of the autoencoder the classifier was trained on are accepted, others refused; a
    # classifier without latent features (the shipped one uses the relative features) takes any
    same = {"rows": rows.tolist(), "encoder_version": local.encoder_version}
    assert (
        httpx.post(
            headers=client_headers(), url=classifier_url + "/predict", json=same, timeout=30
        ).status_code
        == 200
    )
    other = {"rows": rows.tolist(), "encoder_version": "0.0.0-other"}
    answer = httpx.post(headers=client_headers(), url=classifier_url + "/predict", json=other, timeout=30)
    if local.encoder_version is None:
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 409, answer.text
        assert "0.0.0-other" in answer.text and str(local.encoder_version) in answer.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"discs": [{"latent_0": 1.0}]}, "missing feature"),
        ({"rows": [[1.0, 2.0]]}, "every row of 'rows' must hold"),
        ("nan", "NaN"),
        ({}, "exactly one of"),
        ({"discs": []}, "at least 1 item"),
        ({"rows": []}, "at least 1 item"),
        ("ragged", "every row of 'rows' must hold"),
        ({"discs": [{"latent_0": "1.5"}]}, "valid number"),
        ({"rows": [[True]]}, "valid number"),
    ],
)
def test_classifier_rejects_bad_features(classifier_url, body, message):
    import json

    width = len(NarrowingClassifier.from_artifact(Settings.from_env().artifact("classifier")).features)
    if body == "nan":  # a row of the artifact's own width, all NaN
        body = {"rows": [[float("nan")] * width]}
    if body == "ragged":  # rows of different lengths
        body = {"rows": [[0.5] * width, [0.5] * (width - 1)]}

    response = httpx.post(
        classifier_url + "/predict",
        content=json.dumps(body),
        headers={**client_headers(), "content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text


def test_model_services_export_discgeo_metrics(encoder_url, classifier_url):
    for url, stage in ((encoder_url, "encoder"), (classifier_url, "classifier")):
        with urllib.request.urlopen(url + "/metrics") as response:
            text = response.read().decode()
        assert f'discgeo_requests_total{{outcome="ok",stage="{stage}"}}' in text
