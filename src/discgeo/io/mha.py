"""MetaImage (.mha/.mhd) and other SimpleITK-readable volumes, e.g. the SPIDER dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from discgeo.config import Settings
from discgeo.errors import CorruptFileError, InvalidDataError, NotFoundError, UnsupportedFormatError
from discgeo.io.nifti import _smallest_int
from discgeo.volume import LPS_TO_RAS, Volume, check_finite, check_size


def read_mha(path: str | Path, *, settings: Settings | None = None, labels: bool = False) -> Volume:
    """Read a MetaImage file as a canonical (RAS+) volume (ITK stores LPS geometry)."""
    settings = settings or Settings.from_env()
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist")
    try:
        import SimpleITK as sitk
    except ImportError:  # the service images leave it out: no service reads MetaImage
        raise UnsupportedFormatError(
            f"{path.name}: reading MetaImage/NRRD needs SimpleITK (pip install 'discgeo[itk]')"
        ) from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CorruptFileError(f"{path.name} is not a readable MetaImage header") from None
    size = tuple(int(n) for n in reader.GetSize())
    if len(size) != 3 or reader.GetNumberOfComponents() != 1:
        raise InvalidDataError(
            f"{path.name} has size {size} with {reader.GetNumberOfComponents()} components; "
            "discgeo needs one scalar 3D volume"
        )
    check_size(size, settings, what=path.name)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise CorruptFileError(f"{path.name} is truncated or damaged (pixel data unreadable)") from None
    data = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # ITK arrays are (z, y, x)
    check_finite(data, what=path.name)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine = LPS_TO_RAS @ affine
    array = _smallest_int(np.asarray(data)) if labels else np.asarray(data, dtype=np.float32)
    volume = Volume(np.ascontiguousarray(array), affine, size, (), {"format": "metaimage"})
    object.__setattr__(volume, "source_axcodes", volume.axcodes)
    return volume.canonical()


def write_mha(volume: Volume, path: str | Path) -> Path:
    """Write a volume as MetaImage (ITK's LPS geometry; the array's own dtype, compressed): what
    :func:`read_mha` reads back unchanged, e.g. a SPIDER-layout folder of phantoms."""
    import SimpleITK as sitk

    path = Path(path)
    lps = LPS_TO_RAS @ volume.affine  # its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path
