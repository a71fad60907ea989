"""A real browser for the chat page's tests: Debian's chromium, driven by playwright.

Never `playwright install` (it downloads a browser, which fails here): chromium comes from apt-get when the
tests run as root and it is missing, as the container tests do with podman; otherwise they skip with a reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Headless, no sandbox (tests run as root in containers), and nothing that would reach the network by itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing; skip where that is impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"browser tests need {CHROMIUM} (root and apt-get to install the chromium package)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command, timeout in ((["apt-get", "update", "-qq"], 600), (["apt-get", "install", "-y", "-qq", "chromium"], 900)):
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            pytest.skip(f"browser tests need chromium; {' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    if not CHROMIUM.exists():
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM
