"""Model artifact folders: ``metadata.json`` (what, how trained, measured quality, sha256 of files).

A folder is usable only if its metadata names the expected ``kind`` and every file listed under
``files`` exists with the recorded sha256; anything else raises :class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from discgeo.errors import ArtifactError

METADATA = "metadata.json"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Record the sha256 of every file in ``metadata['files']`` and write metadata.json."""
    folder = Path(folder)
    files = metadata.get("files", {})
    missing = [name for name in files.values() if not (folder / name).is_file()]
    if missing:
        raise ArtifactError(f"artifact files missing in {folder}: {', '.join(missing)}")
    metadata = {**metadata, "sha256": {name: sha256(folder / name) for name in files.values()}}
    (folder / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return folder / METADATA


def load_artifact(path: str | Path, *, kind: str) -> tuple[Path, dict[str, Any]]:
    """Verify an artifact folder and return it with its metadata."""
    folder = Path(path)
    meta_path = folder / METADATA
    if not meta_path.is_file():
        raise ArtifactError(f"{folder} is not a model artifact (no {METADATA})")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON: {exc}") from None
    if metadata.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {metadata.get('kind')!r} artifact, expected {kind!r}")
    recorded = metadata.get("sha256", {})
    for name in metadata.get("files", {}).values():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {folder}")
        if recorded.get(name) != sha256(file):
            raise ArtifactError(f"artifact file {name} in {folder} fails sha256 verification")
    return folder, metadata


def record_metric(path: str | Path, *, kind: str, name: str, value: Any) -> Path:
    """Add (or replace) ``metrics[name]`` in a verified artifact's metadata, e.g. a table measured
    after the export (leave-one-case-out, bottleneck sweep)."""
    folder, metadata = load_artifact(path, kind=kind)
    metadata.setdefault("metrics", {})[name] = value
    return write_artifact(folder, metadata)
