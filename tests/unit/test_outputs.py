"""What goes into a patient record: the SR read back with highdicom and checked value by value against
results.json and segment by segment against the SEG; model versions, a stable device UID, research use,
quality flags, findings only when asked for; deterministic UIDs; non-conformant copied attributes."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from discgeo.api import process_study
from discgeo.config import Settings
from discgeo.io.outputs import NARROWING, NARROWING_PROBABILITY, QUALITY_FLAGS, RESEARCH_USE, SR_MEASUREMENTS
from discgeo.io.provenance import Provenance
from discgeo.levels import level_from_name
from discgeo.phantom import SeriesTags, make_case, write_dicom_series
from discgeo.schemas import StudyResult


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    case = make_case(15, 2, spacing=(3.5, 0.9, 0.9), full_coverage=True)
    image = case.labels.with_array((case.labels.array > 200).astype(np.float32) * 900.0 + 100.0)
    return write_dicom_series(
        image, tmp_path_factory.mktemp("study") / "dicom", tags=SeriesTags(uid_seed="out")
    )


def _code(concept) -> tuple[str, str]:
    return (concept.value, concept.scheme_designator)


def _segment_reference(group) -> tuple[str, int]:
    """The SEG instance and segment number a measurement group's IMAGE content item references."""
    for item in group[0].ContentSequence:
        if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]:
            ref = item.ReferencedSOPSequence[0]
            return str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedSegmentNumber)
    raise AssertionError("no referenced segment")


def test_sr_read_back_matches_results_and_seg(threshold_stages, study, tmp_path):
    settings = dataclasses.replace(Settings.from_env(), forward_findings=True, device_uid="1.2.3.4.5")
    processed = process_study(study, stages=threshold_stages, out=tmp_path, settings=settings)
    result = StudyResult.model_validate_json(processed.files["results"].read_text())
    seg = pydicom.dcmread(processed.files["seg"])
    sr = hd.sr.srread(processed.files["sr"])
    segment_levels = {s.SegmentNumber: s.SegmentLabel.split(" ")[0] for s in seg.SegmentSequence}
    versions = result.model_versions
    assert (
        seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
        == versions["segmenter"]
    )
    assert "research use" in seg.SeriesDescription and "research use" in sr.SeriesDescription
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.discs)
    by_level = {d.level: d for d in result.discs}
    for group in groups:
        sop_uid, segment = _segment_reference(group)
        assert sop_uid == seg.SOPInstanceUID
        level = segment_levels[segment]
        disc = by_level[level]
        assert group.tracking_identifier == f"disc {level}" and level_from_name(level) is not None
        values = {_code(m.name): m for m in group.get_measurements()}
        for field, code, unit in SR_MEASUREMENTS:
            measurement = values[(code.value, code.scheme_designator)]
            assert measurement.value == pytest.approx(getattr(disc.geometry, field), rel=1e-6)
            assert _code(measurement.unit) == (unit.value, unit.scheme_designator)
        probability = values[(NARROWING_PROBABILITY.value, NARROWING_PROBABILITY.scheme_designator)]
        assert probability.value == pytest.approx(disc.narrowing_probability, rel=1e-6)
        evaluations = {_code(e.name): e for e in group.get_qualitative_evaluations()}
        narrowing = evaluations[(NARROWING.value, NARROWING.scheme_designator)]
        assert (narrowing.value.value == "52101004") == bool(disc.narrowing)  # SNOMED Present
        flags = {
            flag
            for flag, code in QUALITY_FLAGS.items()
            if (code.value, code.scheme_designator) in evaluations
        }
        assert flags == {f for f in disc.flags if f in QUALITY_FLAGS}
    report = pydicom.dcmread(processed.files["sr"])
    text = "\n".join(str(e.value) for e in report.iterall() if e.VR in ("LO", "UT", "UI", "SH", "ST", "LT"))
    comments = [item.TextValue for item in report.ContentSequence if item.ValueType == "TEXT"]
    assert comments[-1] == RESEARCH_USE and "1.2.3.4.5" in text  # device observer UID as configured
    # the narrowing algorithm names the classifier and, as its parameter, the autoencoder
    assert versions["classifier"] in text and f"autoencoder {versions['encoder']}" in text


def test_findings_only_when_asked_and_uids_are_deterministic(threshold_stages, study, tmp_path):
    settings = dataclasses.replace(Settings.from_env(), forward_findings=False)
    first = process_study(
        study, stages=threshold_stages, out=tmp_path / "a", settings=settings, device="1.2.3"
    )
    again = process_study(
        study, stages=threshold_stages, out=tmp_path / "b", settings=settings, device="1.2.3"
    )
    text = str(pydicom.dcmread(first.files["sr"]))
    assert (
        "Disc mean height" in text and "Disc space narrowing" not in text and "narrowing" not in text.lower()
    )
    for name in ("seg", "sr"):
        a, b = pydicom.dcmread(first.files[name]), pydicom.dcmread(again.files[name])
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    # other models, or a different set of source instances: new objects
    same = Provenance(device_uid="1.2.3", study_uid="1.2.9", revision="r", model_versions={"segmenter": "a"})
    assert same.uid("sr instance") == dataclasses.replace(same).uid("sr instance")
    for change in (
        {"model_versions": {"segmenter": "b"}},
        {"software_version": "9.9.9"},
        {"device_uid": "1.2.4"},
        {"include_findings": True},
        {"revision": "s"},
    ):  # anything that changes the content changes the UIDs
        assert same.uid("sr instance") != dataclasses.replace(same, **change).uid("sr instance"), change
    fewer = process_study(
        study[1:-1], stages=threshold_stages, out=tmp_path / "c", settings=settings, device="1.2.3"
    )
    assert (
        pydicom.dcmread(fewer.files["sr"]).SOPInstanceUID != pydicom.dcmread(first.files["sr"]).SOPInstanceUID
    )


def test_non_conformant_copied_attributes_never_fail_a_study(threshold_stages, study, tmp_path, recwarn):
    odd = []
    for path in study:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "1961-07-04"
        ds.PatientSex = "Male"
        ds.PatientName = "Verylongfamilyname" * 5 + "^Given"
        ds.AccessionNumber = "A" * 30
        ds.SpecificCharacterSet = "ISO_IR 999"
        # every root attribute of the Patient and Study entities is copied, not only the identity
        for keyword, vr, text in (
            ("PatientWeight", "DS", "70kg"),
            ("PatientSize", "DS", "1.812345678901234567"),
            ("PatientAge", "AS", "45"),
            ("PatientBirthTime", "TM", "25:99"),
        ):  # as a real archive holds them: raw bytes that pydicom would not let one assign
            tag = Tag(tag_for_keyword(keyword))
            data = text.encode() + b" " * (len(text) % 2)
            ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
        ds.OtherPatientNames = ["Other" * 40 + "^Name", "", "Short^Name"]  # an empty value among them
        ds.PregnancyStatus = 4  # a binary number (US): copied as it is
        ds.PatientComments = "kept as it is"
        target = tmp_path / "in" / path.name
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target)
        odd.append(target)
    processed = process_study(
        odd, stages=threshold_stages, out=tmp_path / "out", settings=Settings.from_env()
    )
    warnings = processed.result.warnings
    assert any(w.startswith("PatientBirthDate") and "normalised" in w for w in warnings)
    assert any(w.startswith("PatientSex") for w in warnings) and any(
        w.startswith("AccessionNumber") for w in warnings
    )
    assert not any("1961" in w or "Male" in w for w in warnings)  # names of attributes, never values
    sr = pydicom.dcmread(processed.files["sr"])
    family, given = str(sr.PatientName).split("^")
    assert given == "Given" and family.startswith("Verylongfamilyname") and len(family) == 58
    assert sr.PatientBirthDate == "19610704" and sr.PatientSex == "M" and len(str(sr.PatientName)) <= 64
    assert len(sr.AccessionNumber) <= 16 and sr.SpecificCharacterSet == "ISO_IR 192"
    assert "PatientWeight" not in sr and "PatientBirthTime" not in sr and sr.PatientAge == "045Y"
    assert float(sr.PatientSize) == pytest.approx(1.8123456789) and len(str(sr.PatientSize)) <= 16
    assert [len(str(n)) <= 64 for n in sr.OtherPatientNames] == [True, True, True]
    assert str(sr.OtherPatientNames[2]) == "Short^Name" and sr.PatientComments == "kept as it is"
    assert sr.PregnancyStatus == 4 and not any(w.startswith("PregnancyStatus") for w in warnings)
    for keyword in ("PatientWeight", "PatientSize", "PatientAge", "PatientBirthTime", "OtherPatientNames"):
        assert any(w.startswith(keyword) for w in warnings), keyword
    assert not any(w.startswith("PatientComments") for w in warnings)
    seg = pydicom.dcmread(processed.files["seg"])
    assert seg.PatientBirthDate == "19610704" and seg.PatientAge == "045Y" and "PatientWeight" not in seg
    assert not [w for w in recwarn if "Verylong" in str(w.message) or "1961" in str(w.message)]


def test_uncertain_levels_make_no_level_specific_claim(threshold_stages, study, tmp_path):
    """A study whose levels could not be anchored (here: said so by the segmentation) keeps its
    measurements, but SR and SEG code every disc as the generic intervertebral disc structure."""
    from discgeo.levels import DISC_STRUCTURE
    from discgeo.pipeline import LocalStages

    class Unanchored(LocalStages):
        def segment(self, volume):
            labels = super().segment(volume)
            note = "no sacrum in view: the lowest vertebral body is taken as L5"
            return labels.with_array(
                labels.array, levels_from="lowest body", levels_uncertain=True, level_notes=[note]
            )

    stages = Unanchored(segmenter=threshold_stages.segmenter)
    processed = process_study(study, stages=stages, out=tmp_path, settings=Settings.from_env())
    result = StudyResult.model_validate_json(processed.files["results"].read_text())
    assert result.levels.uncertain and result.levels.named_from == "lowest body"
    assert "levels_uncertain" in result.flags and len(result.discs) >= 5
    assert all("level_uncertain" in d.flags and d.geometry.mean_height_mm > 0 for d in result.discs)
    seg = pydicom.dcmread(processed.files["seg"])
    for segment in seg.SegmentSequence:
        assert segment.SegmentLabel.endswith("(level uncertain)")
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == DISC_STRUCTURE.value
    groups = hd.sr.srread(processed.files["sr"]).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(result.discs)
    assert {_code(g.finding_type) for g in groups} == {_code(DISC_STRUCTURE)}
    # the same study anchored: level-specific codes (fourth lumbar vertebra for L4-L5, ...)
    anchored = process_study(study, stages=threshold_stages, out=tmp_path / "a", settings=Settings.from_env())
    groups = hd.sr.srread(anchored.files["sr"]).content.get_volumetric_roi_measurement_groups()
    assert _code(DISC_STRUCTURE) not in {_code(g.finding_type) for g in groups}
