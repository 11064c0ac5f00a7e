"""DICOM series: find them, choose one, and build a volume from it.

Voxels are placed from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (per frame for
enhanced multi-frame objects), never from InstanceNumber or SliceThickness. A series must form one
regular grid: one orientation (within ``orientation_tolerance`` in direction cosines), no duplicate
positions, and evenly spaced slices (within ``slice_spacing_tolerance`` of the median step).
Rescale slope and intercept are applied, so image voxels come back as float32.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from discgeo.config import Settings
from discgeo.errors import (
    CorruptFileError,
    EmptyInputError,
    GeometryError,
    MissingTagError,
    ModalityError,
    NotDicomError,
    NotFoundError,
    SeriesSelectionError,
    TooLargeError,
    UnsupportedFormatError,
    hashed_uid,
)
from discgeo.volume import LPS_TO_RAS, Volume, check_size

Source = str | Path | Sequence[str | Path]
# values are checked where they matter (discgeo.io.conform); pydicom's own warnings would print them
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


# --------------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class _File:
    """One DICOM file: where it came from and how to open it again."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self, *, headers_only: bool) -> Dataset:
        target: Any = self.path if self.path is not None else io.BytesIO(self.data or b"")
        try:
            return pydicom.dcmread(target, stop_before_pixels=headers_only)
        except InvalidDicomError:
            raise NotDicomError(f"{self.name} is not a DICOM file (no DICM preamble)") from None
        except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{self.name} is truncated or damaged: {type(exc).__name__}") from None


MAX_ZIP_MEMBERS = 20_000
MAX_ZIP_BYTES = 2 * 1024**3
MAX_ZIP_RATIO = 200  # uncompressed / compressed size of one member: beyond it, a zip bomb


def _check_zip_members(name: str, members: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip before anything is inflated: too many members, traversal or absolute names, more
    than MAX_ZIP_BYTES uncompressed, or a member inflating more than MAX_ZIP_RATIO times."""
    if len(members) > MAX_ZIP_MEMBERS:
        raise TooLargeError(f"zip archive {name} holds {len(members)} files; the limit is {MAX_ZIP_MEMBERS}")
    for member in members:
        parts = member.filename.replace("\\", "/").split("/")
        if member.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise UnsupportedFormatError(f"zip archive {name} holds a member with an unsafe path")
        if member.file_size > MAX_ZIP_RATIO * max(member.compress_size, 1) and member.file_size > 1_000_000:
            raise TooLargeError(
                f"zip archive {name}: a member inflates {member.file_size // max(member.compress_size, 1)}x"
            )
    total = sum(m.file_size for m in members)
    if total > MAX_ZIP_BYTES:
        raise TooLargeError(f"zip archive {name} inflates to {total} bytes; the limit is {MAX_ZIP_BYTES}")


def _gather(source: Source) -> tuple[list[_File], bool]:
    """Files of a folder (recursive), a zip archive, one file or a list; flag = single explicit file."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise NotFoundError(f"{path} does not exist")
        if path.is_dir():
            files = [_File(str(p.relative_to(path)), path=p) for p in sorted(path.rglob("*")) if p.is_file()]
            if not files:
                raise EmptyInputError(f"folder {path} is empty")
            return files, False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if not members:
                    raise EmptyInputError(f"zip archive {path.name} is empty")
                _check_zip_members(path.name, members)
                return [_File(m.filename, data=archive.read(m)) for m in members], False
        return [_File(path.name, path=path)], True
    paths = [Path(p) for p in source]
    if not paths:
        raise EmptyInputError("no files given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise NotFoundError(f"{len(missing)} of the given files do not exist, e.g. {missing[0]}")
    return [_File(p.name, path=p) for p in paths], len(paths) == 1


# ------------------------------------------------------------------------------------------ frames
@dataclass(frozen=True)
class _Frame:
    file: _File
    index: int | None  # frame number in a multi-frame object, None for single-frame
    position: np.ndarray  # IPP, LPS mm
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float


def _floats(value: Any, n: int, tag: str, name: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise MissingTagError(f"{name}: {tag} is malformed") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise MissingTagError(f"{name}: {tag} must hold {n} finite numbers")
    return out


def _first(seq_holder: Dataset | None, keyword: str) -> Dataset | None:
    if seq_holder is None or keyword not in seq_holder or not seq_holder[keyword].value:
        return None
    return seq_holder[keyword].value[0]


def _frames(ds: Dataset, file: _File) -> list[_Frame]:
    """Geometry of every frame of a (single- or multi-frame) image, from headers only."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        frames = []
        for number, per in enumerate(ds.PerFrameFunctionalGroupsSequence):

            def item(keyword: str, per: Dataset = per) -> Dataset | None:
                return _first(per, keyword) or _first(shared, keyword)

            pos, ori, meas = (
                item("PlanePositionSequence"),
                item("PlaneOrientationSequence"),
                item("PixelMeasuresSequence"),
            )
            if pos is None or "ImagePositionPatient" not in pos:
                raise MissingTagError(f"{file.name}: frame {number + 1} has no ImagePositionPatient")
            if ori is None or "ImageOrientationPatient" not in ori:
                raise MissingTagError(f"{file.name}: frame {number + 1} has no ImageOrientationPatient")
            if meas is None or "PixelSpacing" not in meas:
                raise MissingTagError(f"{file.name}: frame {number + 1} has no PixelSpacing")
            trans = item("PixelValueTransformationSequence")
            frames.append(
                _frame(
                    file,
                    number,
                    pos.ImagePositionPatient,
                    ori.ImageOrientationPatient,
                    meas.PixelSpacing,
                    trans if trans is not None else Dataset(),
                )
            )
        return frames
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise MissingTagError(
                f"{file.name}: {keyword} is missing, so its voxels cannot be placed in patient space"
            )
    return [_frame(file, None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds)]


def _frame(file: _File, index: int | None, ipp: Any, iop: Any, spacing: Any, rescale: Dataset) -> _Frame:
    orientation = _floats(iop, 6, "ImageOrientationPatient", file.name)
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise GeometryError(f"{file.name}: ImageOrientationPatient is not two orthogonal unit vectors")
    pix = _floats(spacing, 2, "PixelSpacing", file.name)
    if np.any(pix <= 0):
        raise MissingTagError(f"{file.name}: PixelSpacing must be positive, got {pix.tolist()}")
    return _Frame(
        file=file,
        index=index,
        position=_floats(ipp, 3, "ImagePositionPatient", file.name),
        row_cosine=row / np.linalg.norm(row),
        col_cosine=col / np.linalg.norm(col),
        pixel_spacing=(float(pix[0]), float(pix[1])),
        slope=float(rescale.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(rescale.get("RescaleIntercept", 0.0) or 0.0),
    )


# ------------------------------------------------------------------------------------------ series
@dataclass
class SeriesInfo:
    """What the headers say about one series (no pixel data read)."""

    uid: str
    modality: str
    description: str
    number: int | None
    rows: int
    columns: int
    frames: list[_Frame] = field(repr=False, default_factory=list)
    headers: Dataset | None = field(repr=False, default=None)
    multiframe: bool = False
    plane: str = "unknown"
    contrast: str = "unknown"
    contrast_reason: str = ""
    problem: str | None = None

    @property
    def label(self) -> str:
        """Short human label (no identifiers)."""
        number = f"#{self.number} " if self.number is not None else ""
        return f"{number}'{self.description or '(no description)'}' [{hashed_uid(self.uid)}]"

    @property
    def n_slices(self) -> int:
        """Number of frames/slices in the series."""
        return len(self.frames)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (LPS) of the first frame."""
        f = self.frames[0]
        return np.cross(f.row_cosine, f.col_cosine)

    def summary(self) -> dict[str, Any]:
        """Plain facts for printing and JSON."""
        out: dict[str, Any] = {
            "series": self.label,
            "modality": self.modality,
            "plane": self.plane,
            "contrast": self.contrast,
            "contrast_reason": self.contrast_reason,
            "slices": self.n_slices,
            "matrix": [self.rows, self.columns],
            "multiframe": self.multiframe,
        }
        if self.frames:
            out["pixel_spacing_mm"] = list(self.frames[0].pixel_spacing)
        if self.problem:
            out["problem"] = self.problem
        return out


_T1 = re.compile(r"T1(?!RHO)", re.IGNORECASE)
_T2 = re.compile(r"T2|STIR|TIRM", re.IGNORECASE)


def _contrast(ds: Dataset) -> tuple[str, str]:
    for keyword in ("SeriesDescription", "ProtocolName", "SequenceName"):
        text = str(ds.get(keyword, "") or "")
        t1, t2 = bool(_T1.search(text)), bool(_T2.search(text))
        if t1 != t2:
            return ("t1" if t1 else "t2"), f"{keyword} {text!r}"
    tr, te = ds.get("RepetitionTime"), ds.get("EchoTime")
    if tr is None and "SharedFunctionalGroupsSequence" in ds:
        timing = _first(_first(ds, "SharedFunctionalGroupsSequence"), "MRTimingAndRelatedParametersSequence")
        tr = timing.get("RepetitionTime") if timing is not None else None
        echo = _first(_first(ds, "SharedFunctionalGroupsSequence"), "MREchoSequence")
        te = echo.get("EffectiveEchoTime") if echo is not None else None
    if tr is not None and te is not None:
        tr_f, te_f = float(tr), float(te)
        if tr_f < 1000 and te_f < 30:
            return "t1", f"timing TR={tr_f:g} ms, TE={te_f:g} ms"
        if tr_f > 1500 and te_f >= 60:
            return "t2", f"timing TR={tr_f:g} ms, TE={te_f:g} ms"
        return "unknown", f"timing TR={tr_f:g} ms, TE={te_f:g} ms is neither T1- nor T2-like"
    return "unknown", "no contrast in the description and no TR/TE"


def _plane(normal: np.ndarray) -> str:
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


@dataclass
class StudyScan:
    """All series found in a source, plus what was skipped."""

    series: list[SeriesInfo]
    skipped: dict[str, int]

    def summary(self) -> list[dict[str, Any]]:
        """Per-series facts."""
        return [s.summary() for s in self.series]


def scan(source: Source) -> StudyScan:
    """Read the headers of every file in ``source`` and group image objects by SeriesInstanceUID.

    Files that are not DICOM are skipped and counted; a DICOM file that cannot be parsed stops the
    scan with :class:`CorruptFileError`, so that no slice is silently lost.

    Raises
    ------
    CorruptFileError
        A DICOM file is truncated or damaged.
    NotDicomError
        ``source`` is one file and it is not DICOM, or no file of a folder/archive is DICOM.
    EmptyInputError
        Nothing to read.
    """
    files, single = _gather(source)
    skipped: dict[str, int] = {}
    groups: dict[str, SeriesInfo] = {}
    for file in files:
        try:
            ds = file.open(headers_only=True)
        except NotDicomError:
            if single:
                raise
            skipped["not DICOM"] = skipped.get("not DICOM", 0) + 1
            continue
        is_image = "Image Storage" in getattr(ds.get("SOPClassUID"), "name", "")
        if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
            if is_image:  # pydicom stops quietly at the end of a cut file
                raise CorruptFileError(
                    f"{file.name} is truncated: image attributes (Rows/Columns) are missing"
                )
            skipped["not an image"] = skipped.get("not an image", 0) + 1
            continue
        uid = str(ds.SeriesInstanceUID)
        info = groups.get(uid)
        if info is None:
            contrast, reason = _contrast(ds)
            number = ds.get("SeriesNumber")
            info = groups[uid] = SeriesInfo(
                uid=uid,
                modality=str(ds.get("Modality", "")),
                description=str(ds.get("SeriesDescription", "") or ""),
                number=int(number) if number not in (None, "") else None,
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                headers=ds,
                multiframe="PerFrameFunctionalGroupsSequence" in ds,
                contrast=contrast,
                contrast_reason=reason,
            )
        if info.problem:
            continue
        if (int(ds.Rows), int(ds.Columns)) != (info.rows, info.columns):
            info.problem = "images of different matrix sizes in one series"
            continue
        try:
            info.frames.extend(_frames(ds, file))
        except (MissingTagError, GeometryError) as exc:
            info.problem = exc.message
    if not groups:
        if skipped.get("not DICOM") == len(files):
            raise NotDicomError(f"none of the {len(files)} file(s) is DICOM")
        raise EmptyInputError(f"no DICOM image objects among {len(files)} file(s) ({_fmt(skipped)})")
    for info in groups.values():
        if info.frames and not info.problem:
            info.plane = _plane(info.normal)
    ordered = sorted(groups.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
    return StudyScan(series=ordered, skipped=skipped)


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items()) or "nothing skipped"


def select_series(study: StudyScan, settings: Settings | None = None) -> tuple[SeriesInfo, str]:
    """Choose the series to analyse and say why.

    Rules: MR only; plane in ``settings.accepted_planes`` (from the direction cosines); contrast by
    ``settings.contrast_preference`` (T1 before T2 by default; unknown contrast last); then the most
    slices; then the finest in-plane pixel spacing.
    """
    settings = settings or Settings.from_env()
    images = [s for s in study.series if not s.problem]
    if not images:
        first = study.series[0]
        raise _problem_error(first)
    mr = [s for s in images if s.modality.upper() == "MR"]
    if not mr:
        found = sorted({s.modality or "unknown" for s in images})
        raise ModalityError(
            f"no MR series in the study (found modality {', '.join(found)}); discgeo reads MR"
        )
    planes = [s for s in mr if s.plane in settings.accepted_planes]
    if not planes:
        seen = ", ".join(f"{s.label} {s.plane}" for s in mr)
        raise SeriesSelectionError(
            f"no {'/'.join(settings.accepted_planes)} MR series (found: {seen}); "
            "set DISCGEO_ACCEPTED_PLANES to accept others"
        )
    order = {c: i for i, c in enumerate(settings.contrast_preference)}

    def rank(s: SeriesInfo) -> tuple[int, int, float]:
        return (order.get(s.contrast, len(order)), -s.n_slices, float(np.prod(s.frames[0].pixel_spacing)))

    best = min(planes, key=rank)
    reasons = [f"{best.plane} MR", f"contrast {best.contrast.upper()} ({best.contrast_reason})"]
    others = [s for s in planes if s is not best]
    if others:
        reasons.append(
            f"preferred over {len(others)} other {best.plane} series by contrast order "
            f"{'>'.join(c.upper() for c in settings.contrast_preference)}, then slice count, then resolution"
        )
    rejected = len(images) - len(planes)
    if rejected:
        reasons.append(f"{rejected} series rejected for modality or plane")
    return best, "; ".join(reasons)


def _problem_error(series: SeriesInfo) -> Exception:
    message = f"series {series.label}: {series.problem}"
    if series.problem and "missing" in series.problem:
        return MissingTagError(message)
    return GeometryError(message)


# ------------------------------------------------------------------------------------------ volume
def build_volume(series: SeriesInfo, settings: Settings | None = None) -> Volume:
    """Read the pixels of ``series`` and place them on one regular grid (canonical RAS+ volume)."""
    settings = settings or Settings.from_env()
    if series.problem:
        raise _problem_error(series)
    if series.modality.upper() != "MR":
        raise ModalityError(f"series {series.label} is {series.modality or 'of unknown modality'}, not MR")
    frames = series.frames
    if len(frames) < 2:
        raise GeometryError(
            f"series {series.label} has a single slice; a 3D volume needs at least two parallel slices"
        )
    check_size((series.columns, series.rows, len(frames)), settings, what=f"series {series.label}")

    ref = frames[0]
    tol = settings.orientation_tolerance
    bad = [
        f
        for f in frames
        if np.max(np.abs(f.row_cosine - ref.row_cosine)) > tol
        or np.max(np.abs(f.col_cosine - ref.col_cosine)) > tol
    ]
    if bad:
        raise GeometryError(
            f"series {series.label} mixes slice orientations: {len(bad)} of {len(frames)} slices differ "
            "from the "
            f"first by more than {tol} in direction cosines (a localizer or several stacks in one series?)"
        )
    if any(f.pixel_spacing != ref.pixel_spacing for f in frames):
        raise GeometryError(f"series {series.label} mixes pixel spacings")
    normal = np.cross(ref.row_cosine, ref.col_cosine)
    depth = np.array([f.position @ normal for f in frames])
    order = np.argsort(depth, kind="stable")
    frames = [frames[i] for i in order]
    depth = depth[order]
    steps = np.diff(depth)
    in_plane = min(ref.pixel_spacing)
    duplicates = int(np.count_nonzero(steps < 1e-3 * max(in_plane, 1.0)))
    if duplicates:
        raise GeometryError(
            f"series {series.label} has {duplicates} duplicate slice position(s) among {len(frames)} slices "
            "(repeated acquisition or several echoes/phases in one series?)"
        )
    median = float(np.median(steps))
    deviation = np.abs(steps - median) / median
    worst = int(np.argmax(deviation))
    if deviation[worst] > settings.slice_spacing_tolerance:
        raise GeometryError(
            f"series {series.label} is not evenly spaced: slices {worst + 1} and {worst + 2} "
            f"(of {len(frames)}, "
            f"ordered along the normal) are {steps[worst]:.3f} mm apart, the median step is {median:.3f} mm "
            "(missing slices?)"
        )
    step = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    expected = frames[0].position + np.outer(np.arange(len(frames)), step)
    drift = np.max(np.linalg.norm(np.array([f.position for f in frames]) - expected, axis=1))
    if drift > settings.slice_spacing_tolerance * median:
        raise GeometryError(
            f"series {series.label}: slice positions do not lie on one line (deviation {drift:.3f} mm)"
        )

    affine = np.eye(4)
    affine[:3, 0] = ref.row_cosine * ref.pixel_spacing[1]
    affine[:3, 1] = ref.col_cosine * ref.pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = frames[0].position
    array = _pixels(series, frames)
    meta = {
        "modality": series.modality,
        "contrast": series.contrast,
        "series": series.label,
        "plane": series.plane,
        "series_uid_hash": hashed_uid(series.uid),
    }
    volume = Volume(array, LPS_TO_RAS @ affine, array.shape, (), meta)
    return volume.canonical()


def _pixels(series: SeriesInfo, frames: list[_Frame]) -> np.ndarray:
    out = np.empty((series.columns, series.rows, len(frames)), dtype=np.float32)
    loaded_file: _File | None = None
    loaded: np.ndarray | None = None
    for k, frame in enumerate(frames):
        if frame.file is not loaded_file:  # multi-frame objects are decoded once
            ds = frame.file.open(headers_only=False)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise CorruptFileError(f"{frame.file.name} is truncated: it has no pixel data")
            try:
                loaded = ds.pixel_array
            except Exception as exc:  # pydicom raises many types for undecodable or short pixel data
                syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
                name = getattr(syntax, "name", str(syntax))
                raise CorruptFileError(
                    f"{frame.file.name}: pixel data cannot be decoded (transfer syntax {name}): "
                    f"{type(exc).__name__}: {str(exc)[:200]}"
                ) from None
            loaded_file = frame.file
        assert loaded is not None
        pixels = loaded if frame.index is None else loaded[frame.index]
        if pixels.shape != (series.rows, series.columns):
            raise CorruptFileError(
                f"{frame.file.name}: pixel array shape {pixels.shape} does not match Rows/Columns"
            )
        out[:, :, k] = pixels.T * np.float32(frame.slope) + np.float32(frame.intercept)
    return out


def series_headers(series: SeriesInfo) -> list[Dataset]:
    """The headers (no pixel data) of every file of a series, e.g. as sources of a DICOM SEG or SR."""
    seen: dict[int, Dataset] = {}
    for frame in series.frames:
        if id(frame.file) not in seen:
            seen[id(frame.file)] = frame.file.open(headers_only=True)
    return list(seen.values())


def read_dicom_study(source: Source, *, settings: Settings | None = None) -> tuple[Volume, list[Dataset]]:
    """The chosen series as a volume plus the headers of its files."""
    settings = settings or Settings.from_env()
    series, reason = select_series(scan(source), settings)
    volume = build_volume(series, settings)
    volume.meta["selection_reason"] = reason
    return volume, series_headers(series)


def read_dicom(source: Source, *, settings: Settings | None = None, series_uid: str | None = None) -> Volume:
    """Read the chosen (or the named) series of a DICOM folder, zip or file list as a canonical volume."""
    settings = settings or Settings.from_env()
    study = scan(source)
    if series_uid is not None:
        matches = [s for s in study.series if s.uid == series_uid]
        if not matches:
            raise SeriesSelectionError(f"series {hashed_uid(series_uid)} is not in the input")
        return build_volume(matches[0], settings)
    series, reason = select_series(study, settings)
    volume = build_volume(series, settings)
    volume.meta["selection_reason"] = reason
    return volume
