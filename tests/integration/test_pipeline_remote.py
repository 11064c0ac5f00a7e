"""RemoteStages over the four real BentoML services give the same StudyResult as LocalStages."""

from __future__ import annotations

import numpy as np
import pytest

from discgeo.classification import NarrowingClassifier
from discgeo.config import Settings
from discgeo.encoding import Encoder
from discgeo.local import client_headers, pipeline_services
from discgeo.phantom import make_case
from discgeo.pipeline import LocalStages, RemoteStageError, RemoteStages, ServiceURLs, analyse_study
from discgeo.segmentation import Segmenter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def urls(tmp_path_factory, threshold_segmenter_artifact):
    env = {"DISCGEO_SEGMENTER_ARTIFACT": str(threshold_segmenter_artifact)}
    with pipeline_services(tmp_path_factory.mktemp("services"), env=env) as started:
        yield ServiceURLs(**started)


def _study():
    case = make_case(17, 3, spacing=(3.3, 0.8, 0.8), full_coverage=True)
    return case.labels.with_array((case.labels.array > 200).astype(np.float32) * 800.0 + 80.0)


def test_remote_equals_local(urls, threshold_segmenter_artifact):
    settings = Settings.from_env()
    local = LocalStages(
        segmenter=Segmenter.from_artifact(threshold_segmenter_artifact),
        encoder=Encoder.from_artifact(settings.artifact("autoencoder")),
        classifier=NarrowingClassifier.from_artifact(settings.artifact("classifier")),
    )
    remote = RemoteStages(urls, headers=client_headers())
    volume = _study()
    expected, labels_local = analyse_study(volume, local, study="s")
    got, labels_remote = analyse_study(volume, remote, study="s")
    remote.close()
    assert np.array_equal(labels_local.array, labels_remote.array)
    assert got.model_versions == expected.model_versions
    assert [d.level for d in got.discs] == [d.level for d in expected.discs]
    for a, b in zip(got.discs, expected.discs, strict=True):
        # the label map crosses HTTP as NIfTI, whose affine is float32: agreement to ~1e-5, not bitwise
        ga, gb = a.geometry.model_dump(), b.geometry.model_dump()
        assert ga.keys() == gb.keys() and ga["level"] == gb["level"]
        for key in ga:
            if key not in ("level", "label"):
                assert np.allclose(ga[key], gb[key], rtol=1e-4, atol=1e-3), key
        assert np.allclose(a.latents, b.latents, atol=1e-4)
        assert a.narrowing_probability == pytest.approx(b.narrowing_probability, abs=1e-6)
        assert a.narrowing == b.narrowing and a.flags == b.flags


def test_no_retry_on_4xx_and_retries_on_unreachable(urls):
    remote = RemoteStages(urls, retries=2, backoff_s=0.05, headers=client_headers())
    with pytest.raises(RemoteStageError, match="classifier service: missing feature") as info:
        remote.classify([{"latent_0": 1.0}])
    assert info.value.http_status == 400
    dead = RemoteStages(
        ServiceURLs(
            segmenter="http://127.0.0.1:9",
            encoder=urls.encoder,
            geometry=urls.geometry,
            classifier=urls.classifier,
        ),
        retries=2,
        backoff_s=0.05,
        headers=client_headers(),
    )
    with pytest.raises(RemoteStageError, match="segmenter service unreachable after 3 tries"):
        dead.segment(_study())


def test_stage_services_need_the_token(urls):
    import httpx

    for url in (urls.segmenter, urls.encoder, urls.geometry, urls.classifier):
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200  # probes stay open
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-enough-length"},
        {"Authorization": "Basic x"},
        client_headers("gateway"),  # the token the gateway's own clients hold opens no stage
    ):
        answer = httpx.post(urls.classifier + "/predict", json={"rows": [[0.0]]}, headers=headers, timeout=10)
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
        assert httpx.post(urls.geometry + "/measure", headers=headers, timeout=10).status_code == 401
    ok = httpx.post(
        urls.classifier + "/predict", json={"rows": [[0.0]]}, headers=client_headers(), timeout=10
    )
    assert ok.status_code == 400  # past authentication, refused for its content
