"""Build the service images with podman or docker (``make images``, ``make base-image``).

One shared runtime image per variant (``deploy/docker/runtime.Containerfile``: Python, the pinned
dependencies, discgeo) and one thin image per service on top of it (``service.Containerfile``: the
service's adapter only), so a node stores the runtime once and a service image adds a few kB.

Base: ``python:3.11-slim-bookworm`` where a registry answers, else a Debian bookworm base built here
by ``mmdebstrap`` from Debian packages (air-gapped build hosts; cached as ``localhost/discgeo/base``).
The CA bundle of the host (a TLS-inspecting proxy's CA lives there) goes in as a build secret, never
into a layer. Image sizes are written to ``bench/results/images.{json,md}``.

    python deploy/images.py [--variant cpu|gpu ...] [--base-only] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {
    "segmenter": "Segmenter",
    "encoder": "Encoder",
    "geometry": "Geometry",
    "classifier": "Classifier",
    "gateway": "Gateway",
}
REGISTRY_BASE = "docker.io/library/python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/discgeo/base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,passwd"
CA_BUNDLES = (Path("/etc/ssl/certs/ca-certificates.crt"), Path("/etc/pki/tls/certs/ca-bundle.crt"))
BUILD = ROOT / "build" / "images"


def version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def image(name: str, variant: str) -> str:
    """The tag of a discgeo image (``localhost/discgeo/<name>:<version>-<variant>``)."""
    return f"localhost/discgeo/{name}:{version()}-{variant}"


def available() -> str | None:
    """The container engine that runs here: podman, else docker with a running engine, else None."""
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return None


def engine() -> list[str]:
    """The container engine command: podman (with this repository's containers.conf unless the
    environment names one: runc and the host's ulimits, see that file) or docker; a clear error when
    neither runs."""
    found = available()
    if found == "podman":
        os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
    if found:
        return [found]
    raise SystemExit(
        "no container engine: install podman (Debian: apt-get install podman buildah runc catatonit "
        "mmdebstrap) or run a Docker engine"
    )


def run(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    command = [*engine(), *args]
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=quiet, text=True)
    if done.returncode != 0:
        detail = (done.stderr or "").strip().splitlines()[-5:] if quiet else []
        raise SystemExit(f"{' '.join(command[:3])} ... failed ({done.returncode}) {' '.join(detail)}")
    return done


def exists(tag: str) -> bool:
    if engine() == ["podman"]:
        return subprocess.run(["podman", "image", "exists", tag]).returncode == 0
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def base_image() -> str:
    """The base to build on: the registry's Python image when it can be pulled, else the local Debian
    base (:func:`debian_base`, built once, then reused)."""
    pulled = subprocess.run([*engine(), "pull", "-q", REGISTRY_BASE], capture_output=True).returncode == 0
    if exists(REGISTRY_BASE) or pulled:
        return REGISTRY_BASE
    print(f"no registry answers for {REGISTRY_BASE}: building on the Debian base {LOCAL_BASE}", flush=True)
    return LOCAL_BASE if exists(LOCAL_BASE) else debian_base()


def debian_base() -> str:
    """Build the Debian bookworm base from Debian packages (mmdebstrap, about 40 s) as LOCAL_BASE."""
    if not shutil.which("mmdebstrap"):
        raise SystemExit("the Debian base needs mmdebstrap (apt-get install mmdebstrap)")
    BUILD.mkdir(parents=True, exist_ok=True)
    tarball = BUILD / "base-bookworm.tar"
    start = time.monotonic()
    packages = f"--include={BASE_PACKAGES}"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", packages, "bookworm", str(tarball)], check=True
    )
    run("import", "--change", 'CMD ["python3"]', str(tarball), LOCAL_BASE, quiet=True)
    tarball.unlink()
    print(f"Debian base {LOCAL_BASE} built in {time.monotonic() - start:.0f} s", flush=True)
    return LOCAL_BASE


def ca_bundle() -> Path:
    """The host's CA bundle for pip inside the build; an empty file where the host has none."""
    for path in CA_BUNDLES:
        if path.is_file():
            return path
    BUILD.mkdir(parents=True, exist_ok=True)
    empty = BUILD / "no-ca.pem"
    empty.write_text("")
    return empty


def _build_args(values: dict[str, str]) -> list[str]:
    return [item for name, value in values.items() for item in ("--build-arg", f"{name}={value}")]


def build(variants: list[str]) -> dict:
    """Build the runtime and the five service images of each variant; returns their sizes."""
    base = base_image()
    secret = f"id=ca,src={ca_bundle()}"
    report: dict = {"base": base, "engine": engine()[0], "variants": {}}
    for variant in variants:
        runtime = image("runtime", variant)
        start = time.monotonic()
        args = {"BASE": base, "VARIANT": variant}
        run(
            "build",
            "--network",
            "host",
            "--secret",
            secret,
            *_build_args(args),
            "-t",
            runtime,
            "-f",
            "deploy/docker/runtime.Containerfile",
            str(ROOT),
        )
        took = {"runtime": round(time.monotonic() - start, 1)}
        for name, cls in SERVICES.items():
            start = time.monotonic()
            args = {"RUNTIME": runtime, "SERVICE": name, "CLASS": cls}
            run(
                "build",
                "-q",
                *_build_args(args),
                "-t",
                image(name, variant),
                "-f",
                "deploy/docker/service.Containerfile",
                str(ROOT),
                quiet=True,
            )
            took[name] = round(time.monotonic() - start, 1)
        report["variants"][variant] = {"build_s": took, **sizes(variant)}
    return report


def sizes(variant: str) -> dict:
    """Size of the runtime image and what each service image adds on top of it (bytes)."""

    def size(tag: str) -> int:
        return int(run("image", "inspect", "--format", "{{.Size}}", tag, quiet=True).stdout.strip())

    runtime = size(image("runtime", variant))
    return {
        "runtime_bytes": runtime,
        "service_adds_bytes": {name: size(image(name, variant)) - runtime for name in SERVICES},
    }


def markdown(report: dict) -> str:
    lines = [
        "# Service images",
        "",
        f"`make images` ({report['engine']}; base `{report['base']}`). Every service image is the shared "
        "runtime image plus the service's adapter; a node stores the runtime once.",
        "",
        "| variant | runtime image | each service adds | build: runtime / all five services |",
        "|---|---|---|---|",
    ]
    for variant, info in report["variants"].items():
        adds = info["service_adds_bytes"]
        services = sum(v for k, v in info["build_s"].items() if k != "runtime")
        lines.append(
            f"| {variant} | {info['runtime_bytes'] / 1e6:.0f} MB | {min(adds.values()) / 1e3:.0f}-"
            f"{max(adds.values()) / 1e3:.0f} kB | {info['build_s']['runtime']:.0f} s / {services:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=("cpu", "gpu"), help="default: cpu and gpu")
    parser.add_argument("--base-only", action="store_true", help="(re)build only the Debian base")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.base_only:
        debian_base()
        return
    report = build(args.variant or ["cpu", "gpu"])
    args.results.mkdir(parents=True, exist_ok=True)
    previous = args.results / "images.json"
    if previous.exists():  # variants built earlier and not now keep their figures
        report["variants"] = {**json.loads(previous.read_text()).get("variants", {}), **report["variants"]}
    (args.results / "images.json").write_text(json.dumps(report, indent=1))
    (args.results / "images.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
