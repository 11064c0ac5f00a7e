"""DICOM series: round trips, selection rules, multi-frame, and one test per malformed input."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage

from discgeo.cli import main
from discgeo.config import Settings
from discgeo.errors import (
    CorruptFileError,
    EmptyInputError,
    GeometryError,
    MissingTagError,
    ModalityError,
    NotDicomError,
    TooLargeError,
)
from discgeo.io import read_dicom
from discgeo.io.dicom import scan, select_series
from discgeo.phantom import SeriesTags, make_case, write_dicom_series
from discgeo.volume import Volume


def _small_volume(seed: int = 0, shape=(6, 20, 24), spacing=(3.5, 0.8, 0.8), rotation_deg=0.0) -> Volume:
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, -50.0, 20.0)
    if rotation_deg:
        c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        rot = np.eye(4)
        rot[1:3, 1:3] = [[c, -s], [s, c]]
        affine = rot @ affine
    return Volume(rng.integers(0, 4000, size=shape).astype(np.float32), affine)


def _write(folder: Path, volume: Volume | None = None, **tags) -> list[Path]:
    return write_dicom_series(volume or _small_volume(), folder, tags=SeriesTags(**tags))


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("rotation", [(0.0, 0.0, 0.0), (20.0, 0.0, 0.0), (12.0, -7.0, 5.0)])
def test_phantom_dicom_roundtrip_identical_voxels_and_affine(tmp_path, rotation):
    case = make_case(3, 1, contrast="t1", spacing=(3.3, 0.9, 0.9), rotation_deg=rotation)
    write_dicom_series(case.image, tmp_path)
    back = read_dicom(tmp_path)
    assert back.shape == case.image.shape
    assert np.array_equal(back.array, case.image.array)
    assert np.max(np.abs(back.affine - case.image.affine)) < 1e-4
    assert back.meta["contrast"] == "t1" and back.meta["plane"] == "sagittal"


def test_zip_and_file_list_sources_give_the_same_volume(tmp_path):
    files = _write(tmp_path / "series")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f"nested/{f.name}")
    from_dir = read_dicom(tmp_path / "series")
    for other in (read_dicom(archive), read_dicom(list(reversed(files)))):
        assert np.array_equal(other.array, from_dir.array)
        assert np.allclose(other.affine, from_dir.affine)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    volume = _small_volume()
    volume = volume.with_array(volume.array * 2.0 - 100.0)
    write_dicom_series(volume, tmp_path, rescale=(2.0, -100.0))
    assert pydicom.dcmread(next(tmp_path.iterdir())).RescaleSlope == 2
    back = read_dicom(tmp_path)
    assert np.array_equal(back.array, volume.array)


def test_enhanced_multiframe_mr_reads_like_the_single_frame_series(tmp_path):
    case = make_case(5, 0, contrast="t2", spacing=(4.0, 1.1, 1.1), rotation_deg=(15.0, 0.0, 0.0))
    files = write_dicom_series(case.image, tmp_path / "single")
    legacy = [pydicom.dcmread(f) for f in files]
    enhanced = LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    study = scan(tmp_path / "mf")
    assert study.series[0].multiframe and study.series[0].n_slices == len(files)
    back = read_dicom(tmp_path / "mf")
    assert np.array_equal(back.array, case.image.array)
    assert np.max(np.abs(back.affine - case.image.affine)) < 1e-4


# ------------------------------------------------------------------------------ series selection
def _study_with_t1_t2_axial(root: Path) -> None:
    _write(root / "t2", series_description="SAG T2 TSE", contrast="t2", series_number=3, uid_seed="s")
    _write(
        root / "t1",
        _small_volume(shape=(5, 20, 24)),
        series_description="SAG T1 TSE",
        contrast="t1",
        series_number=2,
        uid_seed="s",
    )
    write_dicom_series(
        _small_volume(shape=(24, 20, 6), spacing=(0.8, 0.8, 3.5)),
        root / "ax",
        plane="axial",
        tags=SeriesTags(series_description="AX T2", contrast="t2", series_number=4, uid_seed="s"),
    )


def test_selection_prefers_sagittal_t1_and_says_why(tmp_path):
    _study_with_t1_t2_axial(tmp_path)
    study = scan(tmp_path)
    assert sorted(s.plane for s in study.series) == ["axial", "sagittal", "sagittal"]
    chosen, reason = select_series(study, Settings())
    assert chosen.description == "SAG T1 TSE" and chosen.contrast == "t1"
    assert "contrast T1" in reason and "preferred over 1 other sagittal series" in reason
    assert "1 series rejected" in reason
    chosen, _ = select_series(study, Settings(contrast_preference=("t2", "t1")))
    assert chosen.description == "SAG T2 TSE"


def test_contrast_from_timing_when_description_is_silent(tmp_path):
    files = _write(tmp_path, series_description="SAG TSE", contrast="t2")
    for f in files:
        _edit(f, ProtocolName="lumbar")
    series = scan(tmp_path).series[0]
    assert series.contrast == "t2" and "TR=3500" in series.contrast_reason


def test_info_command_reports_series_and_choice(tmp_path, capsys):
    _study_with_t1_t2_axial(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("series #") == 3
    assert "chosen: #2 'SAG T1 TSE'" in out and "why: sagittal MR" in out
    assert "spacing 3.5 x 0.8 x 0.8 mm" in out


# -------------------------------------------------------------------------------- malformed input
def test_not_dicom(tmp_path):
    (tmp_path / "a.dcm").write_text("hello")
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_dicom(tmp_path / "a.dcm")
    with pytest.raises(NotDicomError, match="none of the 1 file"):
        read_dicom(tmp_path)


def test_truncated_file(tmp_path):
    files = _write(tmp_path)
    header = len(files[0].read_bytes()) - 20 * 24 * 2
    files[2].write_bytes(files[2].read_bytes()[: header + 100])  # cut inside the pixel data
    with pytest.raises(CorruptFileError, match=r"IM0003\.dcm"):
        read_dicom(tmp_path)
    files[2].write_bytes(files[2].read_bytes()[: header - 40])  # cut before the pixel data
    with pytest.raises(CorruptFileError, match=r"IM0003\.dcm is truncated"):
        read_dicom(tmp_path)
    files[3].write_bytes(files[3].read_bytes()[: header // 2])  # cut inside the header
    with pytest.raises(CorruptFileError, match=r"IM0004\.dcm is truncated"):
        read_dicom(files[3])


@pytest.mark.parametrize("keyword", ["PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"])
def test_missing_geometry_tags(tmp_path, keyword):
    files = _write(tmp_path)
    _edit(files[1], **{keyword: None})
    with pytest.raises(MissingTagError, match=f"{keyword} is missing"):
        read_dicom(tmp_path)


def test_mixed_orientations(tmp_path):
    files = _write(tmp_path)
    _edit(files[2], ImageOrientationPatient=[0, 0.9962, 0.0872, 0, -0.0872, 0.9962])
    with pytest.raises(GeometryError, match=r"mixes slice orientations: 1 of 6"):
        read_dicom(tmp_path)


def test_slice_gap(tmp_path):
    files = _write(tmp_path)
    files[3].unlink()
    with pytest.raises(GeometryError, match=r"not evenly spaced.*7\.000 mm apart.*3\.500 mm"):
        read_dicom(tmp_path)


def test_duplicate_positions(tmp_path):
    files = _write(tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "again.dcm")
    with pytest.raises(GeometryError, match="1 duplicate slice position"):
        read_dicom(tmp_path)


def test_non_mr_modality(tmp_path):
    files = _write(tmp_path)
    for f in files:
        _edit(f, Modality="CT")
    with pytest.raises(ModalityError, match="found modality CT"):
        read_dicom(tmp_path)


def test_single_slice(tmp_path):
    files = _write(tmp_path)
    with pytest.raises(GeometryError, match="single slice"):
        read_dicom(files[0])


def test_empty_folder_and_zip(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="is empty"):
        read_dicom(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "e.zip", "w"):
        pass
    with pytest.raises(EmptyInputError, match="is empty"):
        read_dicom(tmp_path / "e.zip")


def test_dimension_limit(tmp_path):
    _write(tmp_path)
    with pytest.raises(TooLargeError, match="DISCGEO_MAX_DIM"):
        read_dicom(tmp_path, settings=Settings(max_dim=16))


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "x.dcm").write_text("no")
    assert main(["info", str(tmp_path / "x.dcm")]) == 2
    assert "discgeo: error: x.dcm is not a DICOM file" in capsys.readouterr().err
