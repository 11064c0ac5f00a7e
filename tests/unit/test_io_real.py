"""Readers against real data: the shared T2 cases, the SPIDER mask and pydicom's bundled MR files."""

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import REAL_CASES
from discgeo.config import Settings
from discgeo.errors import CorruptFileError, DiscgeoError, GeometryError, SeriesSelectionError
from discgeo.io import read_dicom, read_volume


@pytest.mark.parametrize("case", REAL_CASES)
def test_real_t2_cases_read_as_documented(ivd_dir, case):
    image = read_volume(ivd_dir / f"{case}.nii.gz")
    labels = read_volume(ivd_dir / f"{case}_discs.nii.gz", labels=True)
    # as stored: 221 x 221 x 67 at 1 mm, axes superior->inferior, anterior->posterior, across (README)
    assert image.source_shape == (221, 221, 67)
    assert image.source_axcodes == ("I", "P", "L")
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    # canonical RAS+: the 67 sagittal slices first
    assert image.shape == (67, 221, 221) and image.axcodes == ("R", "A", "S")
    assert image.array.dtype == np.float32 and image.array.max() > 100
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
    assert set(np.unique(labels.array)) == {0, 1, 2, 3, 4, 5}
    # label 1 (L5-S1) is the lowest disc: smallest superior coordinate of the five
    z = [np.argwhere(labels.array == k)[:, 2].mean() for k in range(1, 6)]
    assert z == sorted(z)


def test_native_masks_placed_on_the_1mm_grid_of_their_case():
    """Subject 25's native discs (4.4 mm slices, another world frame) moved onto case-25's 1 mm grid by
    one translation (the mean of the per-disc centroid differences): each disc keeps its volume, and
    L5-S1, where the two manual masks agree, overlaps the 1 mm mask almost exactly (the 1 mm masks are
    inflated at the upper levels: Dice 0.89 at L1-L2)."""
    from discgeo import realdata
    from discgeo.io import read_labels
    from discgeo.segmentation import dice_per_level

    placed, shift = realdata.native_on_case_grid("case-25")
    native = read_labels(realdata.ivd_masks_dir() / "ivd-25_discs.nii.gz")
    manual = realdata.as_spider_labels(read_labels(realdata.ivd_t2_dir() / "case-25_discs.nii.gz"))
    placed_array, native_array = np.asarray(placed.array), np.asarray(native.array)
    voxel_mm3 = abs(np.linalg.det(native.affine[:3, :3]))
    for v in range(1, 6):
        assert (
            abs(np.count_nonzero(placed_array == 200 + v) - np.count_nonzero(native_array == v) * voxel_mm3)
            <= 1
        )
    np.testing.assert_allclose(shift, [-18.1, -51.6, -29.7], atol=0.1)
    dice = {r["level"]: r["dice"] for r in dice_per_level(manual, placed)}
    assert dice["L5-S1"] > 0.98 and 0.85 < dice["L1-L2"] < 0.93


def test_real_spider_mask(spider_dir):
    mask = read_volume(spider_dir / "masks" / "1_t1.mha", labels=True)
    assert mask.spacing == pytest.approx((3.32, 0.625, 0.50), abs=0.005)
    assert mask.shape == (50, 448, 578)
    assert set(np.unique(mask.array)) == {0, *range(1, 8), 100, *range(201, 208)}
    centre_z = {k: np.argwhere(mask.array == k)[:, 2].mean() for k in (201, 1, 202, 2)}
    # vertebra n sits directly above disc 200+n
    assert centre_z[201] < centre_z[1] < centre_z[202] < centre_z[2]


ANY_PLANE = Settings(accepted_planes=("sagittal", "coronal", "axial"))

BUNDLED_MR = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
    "MR_truncated.dcm",
]


@pytest.mark.parametrize("name", BUNDLED_MR)
def test_bundled_real_mr_single_files_fail_clearly(name):
    """Each is one real MR slice: a clear 'single slice' or 'truncated' error, never a crash."""
    path = get_testdata_file(name, download=False)
    assert path is not None
    # default rules: these axial slices are rejected by plane, and the message says so
    with pytest.raises(SeriesSelectionError, match=r"no sagittal MR series .* axial"):
        read_dicom(path)
    with pytest.raises(DiscgeoError) as info:
        read_dicom(path, settings=ANY_PLANE)
    assert isinstance(info.value, GeometryError) and "single slice" in info.value.message


def test_bundled_truncated_mr_in_a_series_names_the_file(tmp_path):
    _stack(tmp_path, "MR_truncated.dcm")
    with pytest.raises(CorruptFileError, match=r"0\.dcm: pixel data cannot be decoded"):
        read_dicom(tmp_path, settings=ANY_PLANE)


def _stack(folder, name, n=3, step=2.5):
    source = pydicom.dcmread(get_testdata_file(name, download=False))
    row = np.array(source.ImageOrientationPatient[:3], dtype=float)
    col = np.array(source.ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(row, col)
    origin = np.array(source.ImagePositionPatient, dtype=float)
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file(name, download=False))
        ds.ImagePositionPatient = [float(v) for v in origin + step * k * normal]
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{k}.dcm")
    return source, normal


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"]
)
def test_bundled_real_mr_stacked_into_a_series(tmp_path, name):
    """A real vendor slice copied at three positions along its normal reads as one 3D volume."""
    source, normal = _stack(tmp_path, name)
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False)).pixel_array
    shutil.copy(__file__, tmp_path / "notes.txt")  # a stray non-DICOM file is skipped
    volume = read_dicom(tmp_path, settings=ANY_PLANE)
    assert volume.spacing[np.argmax(np.abs(volume.direction.T @ (normal * [-1, -1, 1])))] == pytest.approx(
        2.5
    )
    slope = float(source.get("RescaleSlope", 1))
    intercept = float(source.get("RescaleIntercept", 0))
    assert sorted(volume.array.ravel())[::97] == pytest.approx(
        sorted(np.tile(reference.astype(np.float32) * slope + intercept, 3).ravel())[::97]
    )
