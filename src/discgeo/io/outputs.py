"""Result files: results.json, labels.nii.gz, DICOM SEG + SR (TID 1500), and an overview PNG.

Measurements in the SR use UCUM units; concepts without a standard code use the private coding
scheme ``99DISCGEO`` (DICOM PS3.16 allows "99"-prefixed local schemes), the disc itself is coded by
its SNOMED CT body structure, and each disc's measurement group references its segment in the SEG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from discgeo import __version__, levels
from discgeo.io.nifti import write_nifti
from discgeo.io.provenance import Provenance
from discgeo.io.seg import write_seg
from discgeo.schemas import StudyResult
from discgeo.volume import Volume

SCHEME = "99DISCGEO"
UNITLESS = Code("1", "UCUM", "no units")
# (result field, code, UCUM unit)
SR_MEASUREMENTS: tuple[tuple[str, Code, Code], ...] = (
    ("volume_mm3", codes.SCT.Volume, codes.UCUM.CubicMillimeter),
    ("mean_height_mm", Code("mean-height", SCHEME, "Disc mean height"), codes.UCUM.Millimeter),
    ("middle_height_mm", Code("middle-height", SCHEME, "Disc middle height"), codes.UCUM.Millimeter),
    ("anterior_height_mm", Code("anterior-height", SCHEME, "Disc anterior height"), codes.UCUM.Millimeter),
    ("posterior_height_mm", Code("posterior-height", SCHEME, "Disc posterior height"), codes.UCUM.Millimeter),
    ("ap_width_mm", Code("ap-width", SCHEME, "Disc anteroposterior width"), codes.UCUM.Millimeter),
    ("lateral_width_mm", Code("lateral-width", SCHEME, "Disc lateral width"), codes.UCUM.Millimeter),
    (
        "midsagittal_area_mm2",
        Code("midsagittal-area", SCHEME, "Disc mid-sagittal area"),
        Code("mm2", "UCUM", "square millimeter"),
    ),
    ("wedge_angle_deg", Code("wedge-angle", SCHEME, "Disc wedge angle"), codes.UCUM.Degree),
    ("sagittal_angle_deg", Code("sagittal-angle", SCHEME, "Disc sagittal tilt angle"), codes.UCUM.Degree),
)
NARROWING = Code("narrowing", SCHEME, "Disc space narrowing")
NARROWING_PROBABILITY = Code("narrowing-probability", SCHEME, "Probability of disc space narrowing")


QUALITY_FLAGS = {
    "unusual_shape": Code("unusual-shape", SCHEME, "Unusual disc shape (poor autoencoder reconstruction)"),
    "too_large_for_encoder": Code("too-large-for-encoder", SCHEME, "Disc larger than the encoder's crop"),
}
RESEARCH_USE = "Research use only, not for diagnosis: measurements and findings are not validated clinically."
SR_SERIES_DESCRIPTION = "discgeo measurements: research use, not for diagnosis"


def write_sr(
    result: StudyResult,
    seg: Dataset,
    source_images: Sequence[Dataset],
    path: str | Path,
    *,
    provenance: Provenance,
    series_number: int = 902,
) -> Path:
    """A Comprehensive 3D SR (TID 1500 measurement report) with one measurement group per disc.

    Each group references its segment in ``seg``; its measurements name the geometry algorithm, the
    narrowing probability and finding (only when ``provenance.include_findings``) the classifier and
    autoencoder versions; per-disc quality flags are qualitative evaluations; a comment states
    research use. UIDs come from ``provenance``.
    """
    versions = provenance.model_versions
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid,
            name="discgeo",
            manufacturer_name="discgeo",
            model_name=f"discgeo {__version__}",
        ),
    )
    segmenter = hd.sr.AlgorithmIdentification(
        name="discgeo segmenter", version=versions.get("segmenter", "unknown")
    )
    geometry = hd.sr.AlgorithmIdentification(name="discgeo geometry", version=__version__)
    classifier = hd.sr.AlgorithmIdentification(
        name="discgeo narrowing classifier",
        version=versions.get("classifier", "unknown"),
        parameters=[f"autoencoder {versions.get('encoder', 'unknown')}"],
    )
    segment_of = {desc.SegmentLabel.split(" ")[0]: desc.SegmentNumber for desc in seg.SegmentSequence}
    # every disc was segmented from the whole series: reference the series, not each of its images
    source_series = hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID)
    groups = []
    for disc in result.discs:
        if disc.level not in segment_of:
            continue
        measurements = [
            hd.sr.Measurement(
                name=code, value=float(getattr(disc.geometry, field)), unit=unit, algorithm_id=geometry
            )
            for field, code, unit in SR_MEASUREMENTS
        ]
        evaluations = [
            hd.sr.QualitativeEvaluation(name=QUALITY_FLAGS[flag], value=codes.SCT.Present)
            for flag in disc.flags
            if flag in QUALITY_FLAGS
        ]
        if provenance.include_findings and disc.narrowing_probability is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=NARROWING_PROBABILITY,
                    value=disc.narrowing_probability,
                    unit=UNITLESS,
                    algorithm_id=classifier,
                )
            )
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=NARROWING, value=codes.SCT.Present if disc.narrowing else codes.SCT.Absent
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=provenance.uid(f"tracking {disc.level}"), identifier=f"disc {disc.level}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    seg.SOPClassUID, seg.SOPInstanceUID, segment_of[disc.level], source_series=source_series
                ),
                finding_type=levels.disc_structure_code(disc.level, uncertain=result.levels.uncertain),
                algorithm_id=segmenter,
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=Code("24636-7", "LN", "MR Lumbar spine"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=RESEARCH_USE,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, seg],
        content=report,
        series_instance_uid=provenance.uid("sr series"),
        series_number=series_number,
        sop_instance_uid=provenance.uid("sr instance"),
        instance_number=1,
        manufacturer="discgeo",
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path


# matplotlib's tab10 colours, one per disc
DISC_COLOURS = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.float32,
)


def overview_png(image: Volume, labels: Volume, result: StudyResult, path: str | Path) -> Path:
    """Mid-sagittal slice (anterior left, head up, square millimetres) with coloured discs, their levels
    and key numbers. Drawn with Pillow: a fraction of the time of a plotting library."""
    from PIL import Image, ImageDraw, ImageFont

    image, labels = image.canonical(), labels.canonical()
    counts = (labels.array > 0).reshape(labels.shape[0], -1).sum(axis=1)
    mid = int(np.argmax(counts)) if counts.any() else labels.shape[0] // 2
    picture = np.asarray(image.array[mid], dtype=np.float32).T[::-1, ::-1]  # rows: head->feet
    mask = np.asarray(labels.array[mid]).T[::-1, ::-1]
    top = float(np.percentile(picture, 99.5)) or 1.0
    rgb = np.repeat((np.clip(picture / top, 0, 1) * 255)[..., None], 3, axis=-1)
    for i, disc in enumerate(result.discs):
        region = mask == disc.label
        rgb[region] = 0.45 * rgb[region] + 0.55 * DISC_COLOURS[i % len(DISC_COLOURS)]
    # one pixel = 0.5 mm, at most 700 pixels high
    sy, sz = image.spacing[1], image.spacing[2]
    scale = min(2.0, 700 / (picture.shape[0] * sz))
    size = (max(1, round(picture.shape[1] * sy * scale)), max(1, round(picture.shape[0] * sz * scale)))
    slice_image = Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    margin, text_width = 28, 330
    canvas = Image.new("RGB", (size[0] + text_width, size[1] + margin), "black")
    canvas.paste(slice_image, (0, margin))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    draw.text((4, 6), f"discgeo {__version__}: {len(result.discs)} discs", fill="white", font=font)
    for i, disc in enumerate(result.discs):
        rows, cols = np.nonzero(mask == disc.label)
        if rows.size == 0:
            continue
        verdict = ""
        if disc.narrowing_probability is not None:
            flag = " NARROWED" if disc.narrowing else ""
            verdict = f"  narrowing p={disc.narrowing_probability:.2f}{flag}"
        x = (cols.max() + 0.5) * sy * scale
        y = margin + (rows.mean() + 0.5) * sz * scale
        colour = tuple(int(c) for c in DISC_COLOURS[i % len(DISC_COLOURS)])
        draw.line([(x + 2, y), (size[0] + 6, y)], fill=colour, width=1)  # leader into the text panel
        text = f"{disc.level}  h={disc.geometry.mean_height_mm:.1f} mm{verdict}"
        draw.text((size[0] + 10, y), text, fill=colour, font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=False)
    return path


def write_outputs(
    out: str | Path,
    result: StudyResult,
    image: Volume,
    labels: Volume,
    source_images: Sequence[Dataset] | None = None,
    *,
    provenance: Provenance | None = None,
) -> dict[str, Path]:
    """Write every result file of one study; DICOM SEG and SR only when the input was DICOM (then
    ``provenance`` is required and ``source_images`` must already be conformant:
    :func:`discgeo.io.conform.conform_sources`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results": out / "results.json",
        "labels": out / "labels.nii.gz",
        "overview": out / "overview.png",
    }
    files["results"].write_text(result.model_dump_json(indent=1))
    write_nifti(labels, files["labels"])
    overview_png(image, labels, result, files["overview"])
    if source_images:
        if provenance is None:
            raise ValueError("DICOM outputs need their provenance")
        discs = [(d.label, d.level) for d in result.discs]
        files["seg"] = out / "seg.dcm"
        with warnings.catch_warnings():  # highdicom's and pydicom's warnings quote header values
            warnings.simplefilter("ignore", UserWarning)
            seg = write_seg(
                labels,
                source_images,
                files["seg"],
                discs=discs,
                provenance=provenance,
                levels_uncertain=result.levels.uncertain,
            )
            files["sr"] = write_sr(result, seg, source_images, out / "sr.dcm", provenance=provenance)
    return files
