"""DICOM Segmentation objects of the discs (highdicom): write one segment per disc, read back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from discgeo import __version__, levels
from discgeo.errors import CorruptFileError, InvalidDataError, NotFoundError, UnsupportedFormatError
from discgeo.io.provenance import Provenance
from discgeo.volume import LPS_TO_RAS, Volume

SERIES_DESCRIPTION = "discgeo discs: research use, not for diagnosis"


def write_seg(
    labels: Volume,
    source_images: Sequence[Dataset],
    path: str | Path,
    *,
    discs: Sequence[tuple[int, str]],
    provenance: Provenance,
    series_number: int = 901,
    levels_uncertain: bool = False,
) -> hd.seg.Segmentation:
    """Write the discs of ``labels`` as a binary DICOM SEG referencing ``source_images``; returns it.

    ``discs`` lists ``(label value, level name)``; segment n is the n-th disc, labelled with its level
    and coded with the SNOMED CT structure of that disc; with ``levels_uncertain`` the label says so
    and the code is the generic intervertebral disc structure. The label map must share the source series'
    frame of reference (any grid: highdicom matches frames by their positions). UIDs come from
    ``provenance`` (the same study, revision and models give the same SEG), the algorithm is the
    segmenter artifact with its version.
    """
    if not discs:
        raise InvalidDataError("no discs to write into a DICOM SEG")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="discgeo segmenter",
        version=provenance.model_versions.get("segmenter", "unknown"),
        family=codes.cid7162.ArtificialIntelligence,
        source=f"discgeo {__version__}",
    )
    segment_map = np.zeros(labels.shape, dtype=np.uint8)
    descriptions = []
    for number, (value, level) in enumerate(discs, start=1):
        segment_map[labels.array == value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{level} intervertebral disc"
                + (" (level uncertain)" if levels_uncertain else ""),
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=levels.disc_structure_code(level, uncertain=levels_uncertain),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=provenance.uid(f"tracking {level}"),
                tracking_id=f"disc {level}",
            )
        )
    # highdicom volumes index (slice, row, column) and use LPS; write slices along the source normal
    oriented = labels.with_array(segment_map).reoriented(("R", "I", "P"))
    volume = hd.Volume(
        array=oriented.array,
        affine=LPS_TO_RAS @ oriented.affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=source_images[0].FrameOfReferenceUID,
    )
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=provenance.uid("seg series"),
        series_number=series_number,
        sop_instance_uid=provenance.uid("seg instance"),
        instance_number=1,
        manufacturer="discgeo",
        manufacturer_model_name="discgeo",
        software_versions=__version__,
        device_serial_number=provenance.device_uid,
        series_description=SERIES_DESCRIPTION,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


def read_seg(path: str | Path) -> Volume:
    """Read a DICOM SEG as a label map (canonical RAS+).

    Segments whose label names a disc level ('L4-L5 ...') get that level's SPIDER label (202 for
    L4-L5); other segments keep their segment number.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        raise UnsupportedFormatError(f"{path.name} is not DICOM") from None
    if ds.get("Modality") != "SEG":
        raise UnsupportedFormatError(
            f"{path.name} is DICOM {ds.get('Modality', '?')}, not a segmentation (SEG)"
        )
    try:
        seg = hd.seg.Segmentation.from_dataset(ds)
        volume = seg.get_volume(combine_segments=True, relabel=False)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise CorruptFileError(f"{path.name}: cannot build a volume from this SEG ({exc})") from None
    array = np.asarray(volume.array)
    out = np.zeros(array.shape, dtype=np.uint8 if array.max() < 200 else np.int16)
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        index = levels.level_from_name(str(description.segment_label))
        out[array == number] = levels.disc_label(index) if index is not None else number
    affine = LPS_TO_RAS @ np.asarray(volume.affine)
    if out.ndim == 2:
        out = out[None]
    return Volume(out, affine, meta={"format": "dicom-seg"}).canonical()
