"""Building and running the image with podman, as ../shared/CONTAINERS.md describes for this machine.

No Docker engine here: podman with the runc runtime builds the real Dockerfile. Official base images
cannot be pulled, so a Debian base is bootstrapped with debootstrap and imported. Containers use the host
network and the server binds 127.0.0.1, so every byte of test traffic stays on loopback.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / "docker" / "wheels"
TORCH_VERSION = "2.13.0"


def run(command: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def ensure_tools() -> None:
    """Install podman, runc and debootstrap with apt-get when missing; skip where that is impossible."""
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"container tests need {', '.join(missing)} (root and apt-get to install them)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], timeout=600, env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], timeout=900, env=env)


def bootstrap_base(name: str, workdir: Path) -> None:
    """A Debian bookworm base with Python, the host's extra CA certificates and `python` -> `python3`."""
    rootfs = workdir / "rootfs"
    run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
         "bookworm", str(rootfs)],
        timeout=900,
    )  # fmt: skip
    for certificate in glob.glob("/usr/local/share/ca-certificates/*.crt"):
        shutil.copy(certificate, rootfs / "usr/local/share/ca-certificates/")
    run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120)
    (rootfs / "usr/bin/python").unlink(missing_ok=True)
    (rootfs / "usr/bin/python").symlink_to("python3")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run([*PODMAN, "import", "-", name], timeout=600, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def local_torch_wheel() -> Path | None:
    """The CPU torch wheel pip finds locally (PIP_FIND_LINKS), for builds that cannot reach PyTorch's index."""
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()):
        for wheel in sorted(Path(folder).glob(f"torch-{TORCH_VERSION}*.whl")):
            return wheel
    return None


def dangling_images() -> set[str]:
    return set(run([*PODMAN, "images", "-q", "--filter", "dangling=true"], timeout=60).stdout.split())


def build_image(tag: str, base: str) -> set[str]:
    """Build `tag` from the repository's Dockerfile; returns the ids of the unnamed build-stage images it left."""
    before = dangling_images()
    args = ["--build-arg", f"BASE_IMAGE={base}"]
    wheel = local_torch_wheel()
    copied = None
    if wheel is not None:
        copied = WHEELS / wheel.name
        shutil.copy(wheel, copied)
        args += ["--build-arg", "TORCH_INDEX_URL="]
    try:
        run([*PODMAN, "build", "--format", "docker", "--network", "host", *args, "-t", tag, str(REPO)], timeout=1500)
    finally:
        if copied is not None:
            copied.unlink(missing_ok=True)
    return dangling_images() - before


def remove(*, containers: list[str] = (), images: list[str] = ()) -> None:
    for container in containers:
        subprocess.run([*PODMAN, "rm", "-f", container], capture_output=True, timeout=120)
    for image in images:
        subprocess.run([*PODMAN, "rmi", "-f", image], capture_output=True, timeout=300)
