"""The package builds (sdist + wheel), installs into a fresh virtual environment and runs (``make package``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    facts = _check_wheel().check(dist, tmp_path / "work")
    import onlynorm

    assert facts["version"] == f"onlynorm {onlynorm.__version__}"
    assert facts["location"].startswith(str(tmp_path / "work" / "venv"))  # the wheel's copy, not the source tree
    assert "within tolerance" in facts["verify"] and "yes" in facts["verify"]
