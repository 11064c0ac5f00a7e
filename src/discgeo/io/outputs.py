"""Result files: results.json, labels.nii.gz, DICOM SEG + SR (TID 1500), and an overview PNG.

Measurements in the SR use UCUM units; concepts without a standard code use the private coding
scheme ``99DISCGEO`` (DICOM PS3.16 allows "99"-prefixed local schemes), the disc itself is coded by
its SNOMED CT body structure, and each disc's measurement group references its segment in the SEG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from discgeo import __version__, levels
from discgeo.io.nifti import write_nifti
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


def write_sr(
    result: StudyResult,
    seg: Dataset,
    source_images: Sequence[Dataset],
    path: str | Path,
    *,
    series_number: int = 902,
) -> Path:
    """A Comprehensive 3D SR (TID 1500 measurement report) with one measurement group per disc."""
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="discgeo", manufacturer_name="discgeo", model_name=f"discgeo {__version__}"
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name="discgeo", version=__version__)
    segment_of = {
        desc.segment_label.split(" ")[0]: desc.segment_number
        for desc in hd.seg.Segmentation.from_dataset(seg).SegmentSequence
    }
    groups = []
    for disc in result.discs:
        if disc.level not in segment_of:
            continue
        measurements = [
            hd.sr.Measurement(
                name=code, value=float(getattr(disc.geometry, field)), unit=unit, algorithm_id=algorithm
            )
            for field, code, unit in SR_MEASUREMENTS
        ]
        evaluations = []
        if disc.narrowing_probability is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=NARROWING_PROBABILITY,
                    value=disc.narrowing_probability,
                    unit=UNITLESS,
                    algorithm_id=algorithm,
                )
            )
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=NARROWING, value=codes.SCT.Present if disc.narrowing else codes.SCT.Absent
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"disc {disc.level}"),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_of[disc.level]),
                finding_type=levels.disc_structure_code(disc.level),
                algorithm_id=algorithm,
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
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="discgeo",
        is_complete=True,
        series_description="discgeo disc measurements",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path


def overview_png(image: Volume, labels: Volume, result: StudyResult, path: str | Path) -> Path:
    """Mid-sagittal slice (anterior left, head up) with coloured discs, their levels and key numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, labels = image.canonical(), labels.canonical()
    counts = (labels.array > 0).reshape(labels.shape[0], -1).sum(axis=1)
    mid = int(np.argmax(counts)) if counts.any() else labels.shape[0] // 2
    picture = image.array[mid].T[::-1, ::-1]
    mask = labels.array[mid].T[::-1, ::-1]
    sy, sz = image.spacing[1], image.spacing[2]
    fig, ax = plt.subplots(figsize=(6, 7), facecolor="black")
    ax.imshow(picture, cmap="gray", aspect=sz / sy, vmin=0, vmax=float(np.percentile(picture, 99.5)) or 1)
    colours = plt.get_cmap("tab10")
    for i, disc in enumerate(result.discs):
        region = mask == disc.label
        if not region.any():
            continue
        overlay = np.zeros((*region.shape, 4))
        overlay[region] = (*colours(i % 10)[:3], 0.55)
        ax.imshow(overlay, aspect=sz / sy)
        rows, cols = np.nonzero(region)
        verdict = ""
        if disc.narrowing_probability is not None:
            verdict = f"  narrowing p={disc.narrowing_probability:.2f}" + (" (!)" if disc.narrowing else "")
        ax.text(
            cols.max() + 4,
            rows.mean(),
            f"{disc.level}  h={disc.geometry.mean_height_mm:.1f} mm{verdict}",
            color="white",
            fontsize=8,
            va="center",
        )
    ax.set_title(f"discgeo {__version__}: {len(result.discs)} discs", color="white", fontsize=10)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor="black", bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(
    out: str | Path,
    result: StudyResult,
    image: Volume,
    labels: Volume,
    source_images: Sequence[Dataset] | None = None,
) -> dict[str, Path]:
    """Write every result file of one study; DICOM SEG and SR only when the input was DICOM."""
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
        import pydicom

        discs = [(d.label, d.level) for d in result.discs]
        files["seg"] = write_seg(labels, source_images, out / "seg.dcm", discs=discs)
        files["sr"] = write_sr(result, pydicom.dcmread(files["seg"]), source_images, out / "sr.dcm")
    return files
