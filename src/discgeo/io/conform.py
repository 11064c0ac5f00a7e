"""Make the attributes that DICOM SEG and SR copy from the source images conformant.

Real archives hold values that break strict writers: ``PatientBirthDate`` ``1961-07-04``,
``PatientSex`` ``Male``, names longer than 64 characters, character sets nobody knows. A study must
never fail for them after the whole pipeline ran. :func:`conform_sources` returns copies of the
source headers in which each such value is normalised where its meaning is unambiguous (a date with
separators, a sex spelled out, an over-long string cut to its VR's length) and dropped otherwise,
plus one warning per attribute (attribute names only: values never reach a log or a result).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

# attributes highdicom copies into the SEG and SR (patient, study and series identity)
COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesDate",
    "SeriesTime",
)
MAX_LENGTH = {"PN": 64, "LO": 64, "SH": 16, "CS": 16}
SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_DATE = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")


def _date(value: str) -> str | None:
    match = _DATE.match(value.strip())
    if not match:
        return None
    year, month, day = (int(g) for g in match.groups())
    return f"{year:04d}{month:02d}{day:02d}" if 1 <= month <= 12 and 1 <= day <= 31 else None


def _time(value: str) -> str | None:
    match = _TIME.match(value.strip())
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    return hh + (mm or "") + (ss or "") + (frac or "")


def _conform_value(keyword: str, vr: str, raw: str) -> tuple[str | None, str]:
    """(conformant value or None to drop, what was done); a conformant ``raw`` comes back as it is."""
    if keyword == "PatientSex":
        fixed = SEX.get(raw.strip().upper())
        return (fixed, "normalised") if fixed else (None, "dropped (not M, F or O)")
    if vr == "DA":
        fixed = _date(raw)
        return (fixed, "normalised") if fixed else (None, "dropped (not a date)")
    if vr == "TM":
        fixed = _time(raw)
        return (fixed, "normalised") if fixed else (None, "dropped (not a time)")
    limit = MAX_LENGTH.get(vr)
    if vr == "PN":  # keep every component, shorten the longest ones (alphabetic group only)
        if all(len(group) <= 64 for group in raw.split("=")):
            return raw, "kept"
        components = raw.split("=")[0].split("^")
        while len("^".join(components)) > 64:
            longest = max(range(len(components)), key=lambda i: len(components[i]))
            excess = len("^".join(components)) - 64
            components[longest] = components[longest][: max(1, len(components[longest]) - excess)]
        return "^".join(components), "cut to 64 characters"
    if limit and len(raw) > limit:
        return raw[:limit].strip(), f"cut to {limit} characters"
    return raw, "kept"


def _charset_known(ds: Dataset) -> bool:
    charsets = ds.get("SpecificCharacterSet")
    if charsets is None:
        return True
    values = [charsets] if isinstance(charsets, str) else list(charsets)
    return all(not v or v.strip() in python_encoding for v in values)


def conform_sources(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """Copies of ``sources`` whose copied attributes are conformant, and what was changed."""
    changed: dict[str, str] = {}
    out = []
    for ds in sources:
        fixed = copy.deepcopy(ds)  # headers only: a few kB each
        if not _charset_known(ds):
            changed["SpecificCharacterSet"] = (
                "unknown character set: text decoded as ASCII/Latin-1, written as UTF-8"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns with the value itself
            for keyword in COPIED:
                element = ds.get(keyword)
                if element is None or keyword not in ds:
                    continue
                vr = ds[keyword].VR
                raw = str(ds[keyword].value or "")
                value, what = _conform_value(keyword, vr, raw)
                if not raw or value == raw:
                    continue
                if value:
                    setattr(fixed, keyword, value)
                else:
                    del fixed[keyword]
                changed[keyword] = what
        if "SpecificCharacterSet" in changed or "SpecificCharacterSet" in fixed:
            fixed.SpecificCharacterSet = "ISO_IR 192"
        out.append(fixed)
    return out, [f"{keyword} in the source images: {what}" for keyword, what in sorted(changed.items())]
