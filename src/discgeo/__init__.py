"""discgeo: per-disc shape measurements and disc-narrowing assessment from lumbar spine MRI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("discgeo")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
