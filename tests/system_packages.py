"""Debian packages some tests need (Chromium, Postfix's smtp-sink).

On a laptop without them those tests are skipped with the reason; with
``CI=true`` they are installed when missing, and the tests fail if they
cannot be: CI proves everything, it never skips.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import pytest

from .conftest import ON_CI


def _apt_install(packages: Sequence[str]) -> str:
    cmd = ["apt-get", "install", "-y", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:  # a stale package list: refresh once and try again
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return out.stdout[-2000:] + out.stderr[-2000:]


def require_debian_packages(packages: Sequence[str], files: Sequence[str], what: str) -> None:
    """Make sure ``files`` exist: skip (laptop), or install ``packages`` (CI)."""
    if all(os.path.exists(f) for f in files):
        return
    hint = f"apt-get install {' '.join(packages)}"
    if not ON_CI:
        pytest.skip(f"{what} is not installed ({hint}); skipped its tests")
    log = _apt_install(packages)
    if not all(os.path.exists(f) for f in files):
        pytest.fail(f"CI=true and {what} could not be installed ({hint}):\n{log}")
