"""Readers and writers. :func:`read_volume` picks the reader from what the path is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from discgeo.config import Settings
from discgeo.errors import NotFoundError, UnsupportedFormatError
from discgeo.io.dicom import read_dicom, read_dicom_study
from discgeo.io.mha import read_mha, write_mha
from discgeo.io.nifti import read_nifti, write_nifti
from discgeo.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd")


def read_volume(path: str | Path, *, settings: Settings | None = None, labels: bool = False) -> Volume:
    """Read an image or label volume from NIfTI, MetaImage/NRRD, or DICOM (folder, zip or file)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    name = path.name.lower()
    if path.is_file() and name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path, settings=settings, labels=labels)
    if path.is_file() and name.endswith(ITK_SUFFIXES):
        return read_mha(path, settings=settings, labels=labels)
    return read_dicom(path, settings=settings)


def read_study(
    source: str | Path | Sequence[str | Path], *, settings: Settings | None = None
) -> tuple[Volume, list[Dataset] | None]:
    """One study: a DICOM folder, zip or list of files (the chosen series and the headers of its files),
    or a NIfTI/MHA file (no DICOM headers)."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise NotFoundError(f"{path} does not exist")
        if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
            return read_volume(path, settings=settings), None
    return read_dicom_study(source, settings=settings)


def read_labels(path: str | Path, *, settings: Settings | None = None) -> Volume:
    """Read a label map from NIfTI, MetaImage/NRRD or a DICOM SEG file."""
    path = Path(path)
    name = path.name.lower()
    if path.is_file() and not name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        from discgeo.io.seg import read_seg

        return read_seg(path)
    if path.is_dir():
        raise UnsupportedFormatError(f"{path} is a folder; give a NIfTI, MHA or DICOM SEG file of labels")
    return read_volume(path, settings=settings, labels=True)


__all__ = [
    "read_dicom",
    "read_labels",
    "read_mha",
    "read_nifti",
    "read_study",
    "read_volume",
    "write_mha",
    "write_nifti",
]
