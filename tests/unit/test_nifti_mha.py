import nibabel as nib
import numpy as np
import pytest

from discgeo.config import Settings
from discgeo.errors import (
    CorruptFileError,
    InvalidDataError,
    NotFoundError,
    TooLargeError,
    UnsupportedFormatError,
)
from discgeo.io import read_volume, write_nifti
from discgeo.phantom import make_case


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_nifti(tmp_path, bad):
    data = np.ones((4, 5, 6), dtype=np.float32)
    data[1, 2, 3] = bad
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii.gz")
    with pytest.raises(InvalidDataError, match="1 NaN or infinite"):
        read_volume(tmp_path / "x.nii.gz")


def test_nifti_roundtrip_keeps_voxels_and_affine(tmp_path):
    case = make_case(1, 0, spacing=(3.3, 0.6, 0.6), rotation_deg=(20.0, 0.0, 0.0))
    write_nifti(case.labels, tmp_path / "l.nii.gz")
    back = read_volume(tmp_path / "l.nii.gz", labels=True)
    assert np.array_equal(back.array, case.labels.array)
    assert np.allclose(back.affine, case.labels.affine, atol=1e-4)


def test_nifti_limits_and_damage(tmp_path):
    noise = np.random.default_rng(0).integers(0, 3000, (30, 5, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), tmp_path / "big.nii.gz")
    with pytest.raises(TooLargeError):
        read_volume(tmp_path / "big.nii.gz", settings=Settings(max_dim=20))
    raw = (tmp_path / "big.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "txt.nii").write_text("x" * 400)
    with pytest.raises((UnsupportedFormatError, CorruptFileError)):
        read_volume(tmp_path / "txt.nii")
    with pytest.raises(NotFoundError):
        read_volume(tmp_path / "missing.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InvalidDataError, match="one 3D volume"):
        read_volume(tmp_path / "4d.nii.gz")
    nib.save(nib.Nifti1Image(np.full((3, 4, 5), 1.5, np.float32), np.eye(4)), tmp_path / "f.nii.gz")
    with pytest.raises(InvalidDataError, match="integers"):
        read_volume(tmp_path / "f.nii.gz", labels=True)


def test_mha_geometry_matches_nifti(tmp_path):
    import SimpleITK as sitk

    case = make_case(2, 0, spacing=(3.0, 0.7, 0.7))
    write_nifti(case.labels, tmp_path / "l.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")), str(tmp_path / "l.mha"))
    a = read_volume(tmp_path / "l.nii.gz", labels=True)
    b = read_volume(tmp_path / "l.mha", labels=True)
    assert np.array_equal(a.array, b.array)
    assert np.allclose(a.affine, b.affine, atol=1e-4)


def test_mha_roundtrip_keeps_voxels_and_an_oblique_affine(tmp_path):
    from discgeo.io import write_mha

    case = make_case(3, 0, spacing=(3.3, 0.6, 0.6), rotation_deg=(15.0, 0.0, 5.0))
    write_mha(case.labels, tmp_path / "l.mha")
    back = read_volume(tmp_path / "l.mha", labels=True)
    assert np.array_equal(back.array, case.labels.array)
    assert np.allclose(back.affine, case.labels.affine, atol=1e-4)
