"""``onlynorm demo`` through the command line: the demo modules are found (the CLI lives in its own package), the
quick demo runs and writes its JSON, ``--imagenet`` only extends ``--resnet``."""

from __future__ import annotations

import json

import pytest

from onlynorm.cli.app import main


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_the_quick_demo_runs_from_the_command_line_and_writes_its_json(tmp_path, capsys):
    path = tmp_path / "builtin.json"
    code, out, err = _run(["demo", "--builtin", "--json", str(path)], capsys)
    assert code in (0, None), err
    assert "internal error" not in err and "Traceback" not in err
    assert path.exists() and isinstance(json.loads(path.read_text()), dict)


def test_imagenet_without_resnet_is_refused_in_one_line(capsys):
    code, _, err = _run(["demo", "--imagenet"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--resnet --imagenet" in lines[0], err
