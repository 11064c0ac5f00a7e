"""The discgeo error tree.

Every failure the user can cause (bad input, bad configuration, a missing model) raises a subclass of
:class:`DiscgeoError`. Each class carries the HTTP status a service answers with and a short machine
code; the message names the problem and what to do about it. Messages never contain patient
identifiers: at most a file name or a hashed UID.
"""

from __future__ import annotations

import hashlib


class DiscgeoError(Exception):
    """Base class of all expected discgeo errors."""

    http_status: int = 400
    code: str = "discgeo_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str | int]:
        """Serialise for an HTTP error body."""
        return {"error": self.code, "message": self.message, "status": self.http_status}


class InputError(DiscgeoError):
    """The input cannot be used (generic)."""

    code = "bad_input"


class NotFoundError(InputError):
    """A path does not exist."""

    http_status = 404
    code = "not_found"


class UnsupportedFormatError(InputError):
    """The file is not in a format discgeo reads."""

    http_status = 415
    code = "unsupported_format"


class NotDicomError(UnsupportedFormatError):
    """A file expected to be DICOM is not DICOM."""

    code = "not_dicom"


class CorruptFileError(InputError):
    """A file is truncated or internally inconsistent."""

    code = "corrupt_file"


class EmptyInputError(InputError):
    """A folder, archive or list holds nothing usable."""

    code = "empty_input"


class MissingTagError(InputError):
    """A DICOM attribute needed to place voxels in patient space is absent."""

    code = "missing_tag"


class GeometryError(InputError):
    """Slices do not form one regular 3D grid (gaps, duplicates, mixed orientations...)."""

    code = "inconsistent_geometry"


class ModalityError(InputError):
    """The series is not MR."""

    code = "wrong_modality"


class SeriesSelectionError(InputError):
    """No series of the study satisfies the selection rules."""

    code = "no_suitable_series"


class TooLargeError(InputError):
    """The volume exceeds the configured size limits."""

    http_status = 413
    code = "too_large"


class InvalidDataError(InputError):
    """Voxel values are unusable (NaN, infinity, wrong dimensionality...)."""

    code = "invalid_data"


class ModelMismatchError(InputError):
    """Features come from another model than the one this model was trained on (latents of a
    different autoencoder)."""

    http_status = 409
    code = "model_mismatch"


class ConfigurationError(DiscgeoError):
    """A DISCGEO_* setting is invalid."""

    http_status = 500
    code = "bad_configuration"


class ArtifactError(DiscgeoError):
    """A model artifact is missing, incomplete or fails verification."""

    http_status = 503
    code = "bad_artifact"


def hashed_uid(uid: str) -> str:
    """Return a short, stable, non-reversible tag for a DICOM UID (for logs and messages)."""
    return "uid:" + hashlib.sha256(uid.encode()).hexdigest()[:10]
