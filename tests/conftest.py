"""Shared fixtures: the real data beside the project and small phantom studies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from discgeo import realdata
from discgeo.artifacts import write_artifact
from discgeo.auth import bearer_header, new_token_file
from discgeo.errors import NotFoundError

REAL_CASES = realdata.REAL_CASES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read in place, never copied; see :mod:`discgeo.realdata`)."""
    try:
        return realdata.root()
    except NotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def ivd_dir(shared_data: Path) -> Path:
    return realdata.ivd_t2_dir()


@pytest.fixture(scope="session")
def spider_dir(shared_data: Path) -> Path:
    return realdata.spider_format_dir()


def threshold_model(path, roi=(64, 64)) -> None:
    """ONNX graph: logits = [10 * (0.5 - x), 10 * (x - 0.5)] -> disc wherever the input exceeds 0.5."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *roi])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, *roi])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    ten = helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])
    minus_ten = helper.make_tensor("minus_ten", TensorProto.FLOAT, [], [-10.0])
    nodes = [
        helper.make_node("Sub", ["image", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "ten"], ["disc"]),
        helper.make_node("Mul", ["centred", "minus_ten"], ["background"]),
        helper.make_node("Concat", ["background", "disc"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "threshold", [x], [y], initializer=[half, ten, minus_ten])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime release in use
    onnx.save(model, path)


def band_model(path, centres, roi=(64, 64)) -> None:
    """ONNX graph: logit of class i = -50 * (x - centres[i])^2 -> each voxel the class whose intensity
    band it is in (an exact stand-in for a segmenter of several classes)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *roi])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(centres), *roi])
    inits = [helper.make_tensor("k", TensorProto.FLOAT, [], [-50.0])]
    nodes, outs = [], []
    for i, centre in enumerate(centres):
        inits.append(helper.make_tensor(f"c{i}", TensorProto.FLOAT, [], [float(centre)]))
        nodes += [
            helper.make_node("Sub", ["image", f"c{i}"], [f"d{i}"]),
            helper.make_node("Mul", [f"d{i}", f"d{i}"], [f"q{i}"]),
            helper.make_node("Mul", [f"q{i}", "k"], [f"l{i}"]),
        ]
        outs.append(f"l{i}")
    nodes.append(helper.make_node("Concat", outs, ["logits"], axis=1))
    graph = helper.make_graph(nodes, "bands", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _segmenter_artifact(folder: Path, version: str, *, class_names: list[str] | None = None) -> Path:
    """Write the metadata of a 2D test segmenter (1 mm in-plane, 64 x 64 windows) beside its
    ``model.onnx``; ``class_names`` for a model of more than background and disc."""
    extra = {"class_names": class_names} if class_names else {}
    write_artifact(
        folder,
        {
            "kind": "segmenter",
            "version": version,
            "dims": 2,
            "spacing_mm": [None, 1.0, 1.0],
            "roi": [64, 64],
            "classes": len(class_names) if class_names else 2,
            **extra,
            "files": {"model": "model.onnx"},
        },
    )
    return folder


# normalised intensity of each class in :func:`anatomy_image`: background, sacrum, body, disc
ANATOMY_BANDS = {"background": 0.0, "sacrum": 0.2, "vertebral_body": 0.6, "disc": 1.0}
_ANATOMY_CLASSES = ["background", "disc", "vertebral_body", "sacrum"]


@pytest.fixture(scope="session")
def anatomy_segmenter_artifact(tmp_path_factory) -> Path:
    """A segmenter artifact of the four anatomy classes whose 'model' reads each class from an
    intensity band (:func:`anatomy_image` draws such images from phantom labels)."""
    folder = tmp_path_factory.mktemp("anatomy-segmenter")
    band_model(folder / "model.onnx", [ANATOMY_BANDS[name] for name in _ANATOMY_CLASSES])
    return _segmenter_artifact(folder, "anatomy-bands-test", class_names=_ANATOMY_CLASSES)


def anatomy_image(case):
    """The image of a phantom on a 1 mm in-plane grid (no resampling on the way in) for
    :func:`anatomy_segmenter_artifact`: the canal 250 (the 0.5th percentile of the non-zero voxels),
    sacrum 400, vertebral bodies 700, discs 1000 (the 99.5th), the rest 0; normalised, those are the
    classes' bands."""
    from discgeo import levels

    if tuple(case.labels.spacing[1:]) != (1.0, 1.0):
        raise ValueError("anatomy images need a 1 mm in-plane phantom (make_case(spacing=(s, 1.0, 1.0)))")
    bodies, labels = case.bodies.array, case.labels.array
    image = np.zeros(labels.shape, np.float32)
    image[labels == levels.CANAL_LABEL] = 250.0
    image[bodies == levels.SACRUM_LABEL] = 400.0
    image[(bodies > 0) & (bodies != levels.SACRUM_LABEL)] = 700.0
    image[labels > levels.DISC_LABEL_BASE] = 1000.0
    return case.labels.with_array(image)


@pytest.fixture(scope="session")
def threshold_segmenter_artifact(tmp_path_factory) -> Path:
    """A segmenter artifact whose 'model' marks every voxel brighter than the middle of the intensity
    range as disc: the whole inference path can then be checked against exact answers."""
    folder = tmp_path_factory.mktemp("threshold-segmenter")
    threshold_model(folder / "model.onnx")
    return _segmenter_artifact(folder, "threshold-test")


@pytest.fixture(scope="session")
def threshold_stages(threshold_segmenter_artifact):
    """In-process stages with the exact threshold segmenter and the shipped encoder and classifier."""
    from discgeo.pipeline import LocalStages
    from discgeo.segmentation import Segmenter

    return LocalStages(segmenter=Segmenter.from_artifact(threshold_segmenter_artifact))


@pytest.fixture(scope="session", autouse=True)
def service_tokens(tmp_path_factory) -> dict[str, str]:
    """Token files for every service the tests start (they inherit this process's environment)."""
    folder = tmp_path_factory.mktemp("tokens")
    env = {
        "DISCGEO_STAGE_TOKEN_FILE": str(new_token_file(folder / "stage.token")),
        "DISCGEO_GATEWAY_TOKENS_FILE": str(new_token_file(folder / "gateway.token")),
    }
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def stage_auth(service_tokens) -> dict[str, str]:
    """The Authorization header the stage services accept."""
    return bearer_header(Path(service_tokens["DISCGEO_STAGE_TOKEN_FILE"]), "stage token")


@pytest.fixture(scope="session")
def gateway_auth(service_tokens) -> dict[str, str]:
    """The Authorization header the gateway's API accepts."""
    return bearer_header(Path(service_tokens["DISCGEO_GATEWAY_TOKENS_FILE"]), "gateway token")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the tests (Debian package ``postgresql``; required in CI)."""
    from discgeo.local import postgres

    if not Path("/usr/lib/postgresql").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (make system-deps)")
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    with postgres() as url:
        yield url
