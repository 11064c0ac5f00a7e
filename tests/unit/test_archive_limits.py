"""Archives are checked before anything is inflated: npz headers and members (encoder), zip members
(DICOM studies): a header declaring 10^9 crops, a pickle, a zip bomb or a traversal path is refused
with a specific message and without the memory it would take."""

from __future__ import annotations

import io
import resource
import zipfile

import numpy as np
import pytest

from discgeo.encoding import pack_crops, unpack_crops
from discgeo.errors import InvalidDataError, TooLargeError, UnsupportedFormatError
from discgeo.io.dicom import read_dicom


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _with_npy_header(shape: tuple[int, ...]) -> bytes:
    """An npz whose packed.npy header declares ``shape`` but holds a few bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("packed.npy", header.getvalue() + b"\0" * 64)
        count = io.BytesIO()
        np.save(count, np.int64(1))
        archive.writestr("count.npy", count.getvalue())
    return buffer.getvalue()


def test_npz_headers_are_read_before_the_data():
    crops = np.zeros((2, 64, 64, 64), np.uint8)
    assert unpack_crops(pack_crops(crops), size=64).shape == (2, 64, 64, 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidDataError, match=r"got \[1000000000, 64, 64, 8\]"):
        unpack_crops(_with_npy_header((1_000_000_000, 64, 64, 8)), size=64)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing allocated
    with pytest.raises(UnsupportedFormatError, match="exactly 'packed' and 'count'"):
        unpack_crops(
            _npz(packed=np.zeros((1, 64, 64, 8), np.uint8), count=np.int64(1), extra=np.zeros(3)), size=64
        )
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        unpack_crops(_npz(packed=np.array([object()], dtype=object), count=np.int64(1)), size=64)


def test_npz_bomb_is_refused_by_its_declared_size():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (40000, 64, 64, 8)}
        )
        with archive.open("packed.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(40000 * 64 * 64 * 8 // (1 << 24)):
                member.write(bytes(1 << 24))
        archive.writestr("count.npy", b"\x93NUMPY")
    data = buffer.getvalue()
    assert len(data) < 5_000_000
    with pytest.raises(TooLargeError, match="inflates to"):
        unpack_crops(data, size=64)


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("../../etc/passwd", 10, "unsafe path"),
        ("/abs/file.dcm", 10, "unsafe path"),
        ("bomb.dcm", 50_000_000, "inflates"),
    ],
)
def test_zip_members_are_checked_before_reading(tmp_path, name, size, message):
    path = tmp_path / "study.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, bytes(size))
    with pytest.raises((UnsupportedFormatError, TooLargeError), match=message):
        read_dicom(path)


def test_zip_with_too_many_members_is_refused_before_reading(tmp_path, monkeypatch):
    from discgeo.io import dicom

    monkeypatch.setattr(dicom, "MAX_ZIP_MEMBERS", 3)
    path = tmp_path / "study.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(4):
            archive.writestr(f"{i}.dcm", b"not read")
    with pytest.raises(TooLargeError, match="holds 4 files; the limit is 3"):
        read_dicom(path)
