"""The wire contract: pydantic v2 models shared by the library, the CLI and the services.

Every model forbids unknown fields. ``SCHEMA_VERSION`` changes whenever a field changes meaning or
is removed; adding an optional field keeps it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

SCHEMA_VERSION = "1"

Vector3 = Annotated[list[float], Field(min_length=3, max_length=3)]
# a number in JSON, not a string or a boolean that pydantic would otherwise convert
Number = Annotated[float, Strict()]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiscGeometry(_Model):
    """Measurements of one disc (definitions in :mod:`discgeo.geometry`)."""

    level: str = Field(description="disc level, e.g. L4-L5")
    label: int = Field(description="label value of the disc in the label map")
    volume_mm3: float
    mean_height_mm: float
    middle_height_mm: float
    anterior_height_mm: float
    posterior_height_mm: float
    ap_width_mm: float
    lateral_width_mm: float
    midsagittal_area_mm2: float
    height_to_width_ratio: float
    wedge_angle_deg: float
    sagittal_angle_deg: float
    axial_angle_deg: float
    frontal_angle_deg: float
    pca_sagittal_angle_deg: float
    pca_axial_angle_deg: float
    pca_frontal_angle_deg: float
    centroid_ras_mm: Vector3
    normal_ras: Vector3


class DroppedFragment(_Model):
    """A connected component too small to be a disc."""

    label: int
    volume_mm3: float


class GeometryResult(_Model):
    """All discs of one label map, bottom to top."""

    schema_version: str = SCHEMA_VERSION
    label_convention: str = Field(description="spider, multilabel or binary")
    spacing_mm: Vector3
    discs: list[DiscGeometry]
    dropped_fragments: list[DroppedFragment] = Field(default_factory=list)


class NarrowingRequest(_Model):
    """Features of one or more discs: by name (``discs``) or as rows in the model's order (``rows``)."""

    discs: list[dict[str, Number]] | None = Field(default=None, min_length=1, max_length=1000)
    rows: list[list[Number]] | None = Field(default=None, min_length=1, max_length=1000)
    encoder_version: str | None = Field(
        default=None,
        description="version of the autoencoder that produced the latent features; a classifier "
        "trained on another autoencoder's latents refuses them (409)",
    )


class NarrowingPrediction(_Model):
    """Narrowing probability and label per disc."""

    probabilities: list[float]
    labels: list[int]
    threshold: float
    features: list[str]
    model_version: str


class DiscResult(_Model):
    """Everything the pipeline says about one disc."""

    level: str
    label: int
    geometry: DiscGeometry
    latents: list[float] | None = Field(default=None, description="latent shape code (None if not encoded)")
    reconstruction_iou: float | None = Field(default=None, description="autoencoder reconstruction IoU")
    narrowing_probability: float | None = None
    narrowing: bool | None = None
    flags: list[str] = Field(default_factory=list, description="quality flags, e.g. unusual_shape")


class LevelNaming(_Model):
    """How the disc levels were named (:mod:`discgeo.spine`)."""

    named_from: str = Field(
        default="lowest disc",
        description="sacrum (anchored chain), lowest body (no sacrum in view) or lowest disc (counted)",
    )
    uncertain: bool = Field(
        default=False, description="levels may be off: no level-specific codes in SR and SEG"
    )
    notes: list[str] = Field(default_factory=list)


class StudyResult(_Model):
    """The pipeline's answer for one study."""

    schema_version: str = SCHEMA_VERSION
    study: str = Field(description="hashed study or input identifier (no patient identifiers)")
    input: dict[str, str | float | int | list[float] | list[int]] = Field(default_factory=dict)
    model_versions: dict[str, str]
    discs: list[DiscResult]
    levels: LevelNaming = Field(default_factory=LevelNaming)
    flags: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(
        default_factory=list, description="what was normalised or dropped in the input (names, never values)"
    )
    timings_s: dict[str, float]
