"""``make docs``: the mkdocs site builds with --strict (a broken link or cross-reference fails) and holds the pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", **_env()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    import onlynorm

    for name in onlynorm.__all__:  # every public name has its entry (verify/capacity: under their module)
        assert f'id="onlynorm.{name}"' in api or f'id="onlynorm.{name}.{name}"' in api, name
    assert 'id="onlynorm.nets.onnx.export_onnx"' in api and 'id="onlynorm.targets.sklearn.spec_from_sklearn"' in api
    tutorial = (site / "tutorial" / "index.html").read_text()
    assert "passed=True" in tutorial and "<img" in tutorial  # rendered with its outputs
    home = (site / "index.html").read_text()
    assert 'href="FILE_FORMATS/"' in home and 'href="RESULTS/"' in home


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "NO_MKDOCS_2_WARNING"}
