"""The tutorial notebook runs top to bottom (its own asserts check each step) and is committed with its outputs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_tutorial_executes(tmp_path):
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code), "run `make notebook` so the site shows the outputs"
    fresh = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        fresh, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises on the first failing cell
    text = _stream_text(fresh)
    assert "scikit-learn predict agreement      100.00%" in text
    assert re.search(r"a bound holds on the whole box\s+yes", text) and re.search(r"outcome\s+exact", text)
    assert text.count("passed=True") == 2
    assert any(
        o.output_type == "display_data" and "image/png" in o.data
        for c in fresh.cells
        if c.cell_type == "code"
        for o in c.outputs
    )  # the γ histograms
