"""Disc crops, the packed-bits wire format, and artifact verification."""

from __future__ import annotations

import numpy as np
import pytest

from discgeo import realdata
from discgeo.artifacts import load_artifact, write_artifact
from discgeo.encoding import (
    CropSpec,
    crop_disc,
    disc_crops,
    iou,
    pack_crops,
    sagittal_frame,
    unpack_crops,
)
from discgeo.errors import ArtifactError, InvalidDataError, TooLargeError, UnsupportedFormatError
from discgeo.geometry import find_discs, measure_disc, measure_discs
from discgeo.io import read_labels
from discgeo.phantom import make_case
from discgeo.volume import Volume

ISO = CropSpec(64, (1.0, 1.0, 1.0))  # the first shipped crop: voxel counts are volumes in mm3
SHIPPED = CropSpec.from_metadata(
    {"crop_size": 64, "crop_spacing_mm": [1.0, 0.75, 0.35], "crop_alignment": "sagittal"}
)
CROP_SIZE = ISO.size


@pytest.fixture(scope="module")
def phantom():
    return make_case(21, 0, spacing=(3.3, 0.6, 0.6), full_coverage=True, n_discs=5)


def test_crops_keep_volume_size_and_tilt(phantom):
    result = disc_crops(phantom.labels, spec=ISO)
    assert result.crops.shape == (5, CROP_SIZE, CROP_SIZE, CROP_SIZE) and result.crops.dtype == np.uint8
    assert result.levels == ["L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2"] and not result.too_large
    geometry = measure_discs(phantom.labels)
    for crop, disc in zip(result.crops, geometry.discs, strict=True):
        # 1 mm isotropic crop: voxel count is the volume in mm3 (resampling error only)
        assert crop.sum() == pytest.approx(disc.volume_mm3, rel=0.04)
        # centred by the bounding box (within 1.5 source voxels: a thin end, e.g. a 3.3 mm slice that
        # holds one stray voxel of the disc, vanishes in resampling)
        idx = np.argwhere(crop)
        centre = (idx.min(axis=0) + idx.max(axis=0)) / 2
        tolerance = np.maximum(1.0, 1.5 * np.array(phantom.labels.spacing))
        assert np.all(np.abs(centre - (CROP_SIZE - 1) / 2) <= tolerance)
        # no rotation, no rescaling: the crop measures like the disc
        m = measure_disc(crop.astype(bool), np.eye(4))
        assert m["sagittal_angle_deg"] == pytest.approx(disc.sagittal_angle_deg, abs=1.5)
        assert m["ap_width_mm"] == pytest.approx(disc.ap_width_mm, abs=1.0)
        assert m["mean_height_mm"] == pytest.approx(disc.mean_height_mm, abs=0.5)


def test_crops_are_deterministic_and_real_cases_fit(phantom, ivd_dir):
    a, b = disc_crops(phantom.labels, spec=SHIPPED), disc_crops(phantom.labels, spec=SHIPPED)
    assert np.array_equal(a.crops, b.crops)
    real = disc_crops(read_labels(ivd_dir / "case-20_discs.nii.gz"), spec=SHIPPED)
    assert real.crops.shape[0] == 5 and real.labels == [1, 2, 3, 4, 5]


def test_crops_of_1mm_masks_keep_every_voxel_count_and_extent(ivd_dir):
    """1 mm masks with an odd extent are sampled halfway between voxels: thresholding at 0.5 made each
    such axis one voxel longer (real discs +0-16 % volume); the crop now keeps volume and extent."""
    labels = read_labels(ivd_dir / "case-25_discs.nii.gz").canonical()
    discs, _, _ = find_discs(np.asarray(labels.array).astype(np.int32), labels.affine)
    result = disc_crops(labels, spec=ISO)
    for crop, disc in zip(result.crops, discs, strict=True):
        mask = disc.mask
        assert crop.sum() == mask.sum()
        extent = np.ptp(np.argwhere(mask), axis=0) + 1
        assert np.array_equal(np.ptp(np.argwhere(crop), axis=0) + 1, extent)


def test_too_large_disc_is_reported_not_cut():
    mask = np.zeros((80, 30, 20), bool)
    mask[5:75, 5:25, 5:15] = True  # 70 mm wide at 1 mm
    assert crop_disc(mask, np.eye(4), spec=ISO) is None
    result = disc_crops(Volume(mask.astype(np.uint8), np.eye(4)), spec=ISO)
    assert result.crops.shape[0] == 0
    assert result.too_large == [{"level": "L5-S1", "label": 201, "extent_mm": [70.0, 20.0, 10.0]}]


def test_iou():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    b = a.copy()
    b[0, 2] = True
    assert iou(a, b).tolist() == pytest.approx([2 / 3, 1.0])


def test_pack_unpack_roundtrip_and_errors(phantom):
    crops = disc_crops(phantom.labels, spec=SHIPPED).crops
    data = pack_crops(crops)
    assert len(data) < 5 * 4000  # compact: a few kB per disc, not JSON lists
    assert np.array_equal(unpack_crops(data, size=64), crops)
    with pytest.raises(UnsupportedFormatError):
        unpack_crops(b"not an npz", size=64)
    with pytest.raises(TooLargeError):
        unpack_crops(data, size=64, limit=2)
    with pytest.raises(InvalidDataError, match="uint8"):
        unpack_crops(pack_crops(np.zeros((2, 32, 32, 32))), size=64)  # another encoder's crop size
    with pytest.raises(InvalidDataError):
        pack_crops(np.zeros((2, 30, 30, 30)))


def test_shipped_crop_keeps_the_volume_of_real_native_masks():
    """The 4.4 mm-slice masks are interpolated across the slices and binarised to their own volume:
    each crop holds the disc's volume (voxel count x 0.45 mm3) within 2 %, and every real disc fits."""
    voxel_mm3 = float(np.prod(SHIPPED.spacing_mm))
    for mask in realdata.real_masks(isotropic=False)[:8]:
        result = disc_crops(mask.labels, spec=SHIPPED)
        assert not result.too_large and len(result.crops) == 5
        for crop, disc in zip(result.crops, measure_discs(mask.labels).discs, strict=True):
            assert crop.sum() * voxel_mm3 == pytest.approx(disc.volume_mm3, rel=0.02)


def test_crop_spec_from_metadata():
    assert CropSpec.from_metadata({"crop_size": 64, "crop_spacing_mm": 1.0}) == ISO
    assert ISO.alignment == "voxel"  # artifacts without crop_alignment
    assert CropSpec.from_metadata(SHIPPED.to_metadata()) == SHIPPED  # the artifact's fields round-trip
    assert SHIPPED.extent_mm == pytest.approx((64.0, 48.0, 22.4))
    with pytest.raises(ValueError, match="positive"):
        CropSpec.from_metadata({"crop_size": 64, "crop_spacing_mm": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="alignment"):
        CropSpec.from_metadata({"crop_size": 64, "crop_spacing_mm": 1.0, "crop_alignment": "axial"})


@pytest.mark.parametrize("tilt_deg", [-30.0, 0.0, 12.0, 30.0])
def test_sagittal_crop_takes_out_the_tilt_and_keeps_the_volume(tilt_deg):
    """A 40 x 30 x 6 mm slab tilted in the A-S plane: the frame finds its normal, the crop holds the
    slab's volume within 2 % and spans its 6 mm thickness along S (not the ~20 mm of its tilted box),
    the same crop whatever the tilt."""
    spacing = np.array([1.0, 0.5, 0.5])
    axes = [np.arange(n) * d for n, d in zip((60, 120, 120), spacing, strict=True)]
    r, a, s = np.meshgrid(*axes, indexing="ij")
    t = np.radians(tilt_deg)
    a0, s0 = a - 30, s - 30
    along, across = a0 * np.cos(t) + s0 * np.sin(t), -a0 * np.sin(t) + s0 * np.cos(t)
    mask = (np.abs(r - 30) < 20) & (np.abs(along) < 15) & (np.abs(across) < 3)
    idx = np.argwhere(mask)
    frame = sagittal_frame(idx * spacing)
    assert np.degrees(np.arctan2(frame[2, 1], frame[2, 2])) == pytest.approx(-tilt_deg, abs=0.5)
    crop = crop_disc(mask, np.diag([*spacing, 1.0]), spec=SHIPPED)
    assert crop is not None
    voxel_mm3 = float(np.prod(SHIPPED.spacing_mm))
    assert crop.sum() * voxel_mm3 == pytest.approx(mask.sum() * float(np.prod(spacing)), rel=0.02)
    s_extent = np.ptp(np.argwhere(crop)[:, 2]) + 1
    assert s_extent * SHIPPED.spacing_mm[2] == pytest.approx(6.0, abs=1.0)


def test_artifact_verification(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"weights")
    write_artifact(tmp_path, {"kind": "autoencoder", "version": "1", "files": {"model": "model.bin"}})
    _folder, meta = load_artifact(tmp_path, kind="autoencoder")
    assert meta["sha256"]["model.bin"] == __import__("hashlib").sha256(b"weights").hexdigest()
    with pytest.raises(ArtifactError, match="expected 'segmenter'"):
        load_artifact(tmp_path, kind="segmenter")
    (tmp_path / "model.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tmp_path, kind="autoencoder")
    (tmp_path / "model.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(tmp_path, kind="autoencoder")
    (tmp_path / "metadata.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path, kind="autoencoder")
