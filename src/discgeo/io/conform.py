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
import functools
import re
import warnings
from collections.abc import Sequence

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds, validate_value

# the information entities whose root attributes highdicom copies into the SEG and SR
COPIED_IES = ("Patient", "Study")
# the VRs whose values are text in a header (binary numbers such as US or FD are copied as they are)
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
# maximum value lengths (PS3.5 table 6.2-1) where a cut keeps the meaning
MAX_LENGTH = {"AE": 16, "CS": 16, "LO": 64, "LT": 10240, "SH": 16, "ST": 1024, "UC": 10**6, "PN": 64}
SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_DATE = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")


@functools.cache
def copied_keywords(sop_class_uid: str) -> tuple[str, ...]:
    """Keywords of the root attributes highdicom copies from a source image of ``sop_class_uid``
    (every module of the Patient and Study entities of its IOD, as highdicom's own tables list them)."""
    # highdicom's module tables are not public API; its version is pinned in deploy/docker/constraints.txt
    # and tests/unit/test_outputs.py fails if the tables stop listing what the SEG and SR carry
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    return tuple(
        str(item["keyword"])
        for module in get_iod_module_map()[iod]
        if module["ie"] in COPIED_IES
        for item in attributes[module["key"]]
        if not item["path"]
    )


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


def _age(value: str) -> str | None:
    match = _AGE.match(value.strip().upper())  # a bare number is years, as the value is usually meant
    return f"{int(match.group(1)):03d}{match.group(2) or 'Y'}" if match else None


def _decimal(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return format_number_as_ds(number) if abs(number) < 1e300 else None


def _integer(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() and abs(number) < 2**31 else None


# per VR, how a value whose meaning is unambiguous is rewritten in the VR's form
NORMALISE = {
    "DA": _date,
    "TM": _time,
    "AS": _age,
    "DS": _decimal,
    "IS": _integer,
    "CS": lambda value: value.strip().upper(),
}


def _conform_value(keyword: str, vr: str, raw: str) -> tuple[str | None, str]:
    """(conformant value or None to drop, what was done); a conformant ``raw`` comes back as it is."""
    if _valid(vr, raw) and not (keyword == "PatientSex" and raw not in SEX.values()):
        return raw, "kept"
    if keyword == "PatientSex":
        fixed = SEX.get(raw.strip().upper())
        return (fixed, "normalised") if fixed else (None, "dropped (not M, F or O)")
    if vr == "PN":  # keep every component, shorten the longest ones (alphabetic group only)
        components = raw.split("=")[0].split("^")
        while len("^".join(components)) > MAX_LENGTH["PN"]:
            longest = max(range(len(components)), key=lambda i: len(components[i]))
            excess = len("^".join(components)) - MAX_LENGTH["PN"]
            components[longest] = components[longest][: max(1, len(components[longest]) - excess)]
        fixed, what = "^".join(components), f"cut to {MAX_LENGTH['PN']} characters"
    elif vr in MAX_LENGTH and len(raw) > MAX_LENGTH[vr]:
        fixed, what = raw[: MAX_LENGTH[vr]].strip(), f"cut to {MAX_LENGTH[vr]} characters"
    else:
        fixed, what = (NORMALISE[vr](raw) if vr in NORMALISE else None), "normalised"
    if fixed is not None and _valid(vr, fixed):
        return fixed, what
    return None, f"dropped (not a valid {vr})"


def _valid(vr: str, value: str) -> bool:
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _charset_known(ds: Dataset) -> bool:
    charsets = ds.get("SpecificCharacterSet")
    if charsets is None:
        return True
    values = [charsets] if isinstance(charsets, str) else list(charsets)
    return all(not v or v.strip() in python_encoding for v in values)


def conform_sources(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """Copies of ``sources`` whose copied attributes are conformant, and what was changed.

    Every root attribute highdicom copies (:func:`copied_keywords`) with a text value is checked
    against its VR; each value of a multi-valued attribute on its own. Sequences are copied as they
    are."""
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
            for keyword in copied_keywords(ds.SOPClassUID):
                if keyword not in ds or ds[keyword].VR not in TEXT_VRS or ds[keyword].value in (None, ""):
                    continue
                element = ds[keyword]
                values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
                results = [_conform_value(keyword, element.VR, str(v)) for v in values]
                kept = [value for value, _ in results if value is not None]  # "" stays an empty value
                if kept == [str(v) for v in values]:
                    continue
                if kept:
                    setattr(fixed, keyword, kept if len(kept) > 1 else kept[0])
                else:
                    del fixed[keyword]
                changed[keyword] = next((what for _, what in results if what != "kept"), "normalised")
        if "SpecificCharacterSet" in changed or "SpecificCharacterSet" in fixed:
            fixed.SpecificCharacterSet = "ISO_IR 192"
        out.append(fixed)
    return out, [f"{keyword} in the source images: {what}" for keyword, what in sorted(changed.items())]
