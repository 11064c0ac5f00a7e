"""The Kubernetes manifests run for real (``make kube-play``: ``deploy/k8s/overlays/local`` under
``podman kube play`` with the CPU images): every service becomes ready, a study sent by ``storescu``
to the gateway container comes back as exactly one SEG and one SR in Orthanc, Prometheus scrapes every
container, and ``make kube-down`` leaves nothing behind."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench.containers import run
from deploy import images, kube

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("podman"), reason="podman kube play needs podman"),
]


def test_manifests_run_under_podman_and_a_study_comes_back_as_seg_and_sr(tmp_path):
    images.build(["cpu"])  # cached layers when the image test ran first
    results = run(tmp_path / "work", count=1)
    assert set(results["kube"]["ready_s"]) == set(images.SERVICES)
    assert results["studies"]["states"] == ["forwarded"]
    assert results["studies"]["in_orthanc"] == [{"SEG": 1, "SR": 1}]
    assert all(results["prometheus_up"].values()) and len(results["prometheus_up"]) == 5
    assert "NetworkPolicy/discgeo-default-deny" in results["kube"]["dropped"]
    # kube-down (run() ends with it) removed the pods and every volume it made
    pods = subprocess.run(
        ["podman", "pod", "ps", "-q", "--filter", "name=discgeo-"], capture_output=True, text=True
    )
    assert pods.stdout.strip() == ""
    volumes = subprocess.run(["podman", "volume", "ls", "-q"], capture_output=True, text=True).stdout.split()
    assert not set(volumes) & {*kube.FILLED, *kube.CREATED}
    assert not [v for v in volumes if v.startswith("discgeo-") and v.endswith("-tmp")]  # the emptyDirs
