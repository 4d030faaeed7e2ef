"""Install a built onlynorm wheel into a fresh virtual environment and run it: ``onlynorm --version`` and a tiny
reconstruct → verify through the installed console script.

Usage: ``python scripts/check_wheel.py DIST_DIR WORK_DIR`` (``make package`` builds DIST_DIR with ``python -m build``).

The fresh environment gets onlynorm from the wheel only. Its dependencies (torch alone is hundreds of MB) are not
downloaded again: the running environment's site-packages, minus every onlynorm file in it, is put on the new
environment's path, and pip installs the wheel with ``--no-index`` — so a dependency the wheel declares but that is
missing there fails the install instead of being fetched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

EXTRAS = ("onnx", "cluster", "docs", "dev")


def run(cmd: list[str], cwd: Path, **kwargs) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(
            f"check_wheel: {' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def dependencies_without_onlynorm(work: Path) -> Path:
    """A directory of links to this environment's installed packages, leaving out onlynorm's own entries."""
    deps = work / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if "onlynorm" in entry.name.lower():
            continue
        (deps / entry.name).symlink_to(entry)
    return deps


def check(dist: Path, work: Path) -> dict[str, str]:
    wheels, sdists = sorted(dist.glob("onlynorm-*.whl")), sorted(dist.glob("onlynorm-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"check_wheel: expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    wheel = wheels[0]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = [e for e in EXTRAS if f"Provides-Extra: {e}" not in metadata]
    if "onlynorm/py.typed" not in names or missing:
        raise SystemExit(f"check_wheel: wheel lacks py.typed or extras {missing}")
    work.mkdir(parents=True, exist_ok=True)
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)  # pip runs from here, against the new env
    py = env_dir / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).strip())
    (site / "_dependencies.pth").write_text(str(dependencies_without_onlynorm(work)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            py,
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            wheel,
        ],
        work,
        env=env,
    )
    version = run([env_dir / "bin" / "onlynorm", "--version"], work, env=env).strip()
    location = run([py, "-c", "import onlynorm; print(onlynorm.__file__)"], work, env=env).strip()
    if not location.startswith(str(site)):
        raise SystemExit(f"check_wheel: onlynorm was imported from {location}, not from the wheel in {site}")
    if not (Path(location).parent / "py.typed").exists():
        raise SystemExit("check_wheel: the installed package has no py.typed")
    run(
        [
            py,
            "-c",
            "import torch, onlynorm; onlynorm.MLPSpec.from_module(torch.nn.Sequential(torch.nn.Linear(3, 4), "
            "torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()).save('target.safetensors')",
        ],
        work,
        env=env,
    )
    run([env_dir / "bin" / "onlynorm", "reconstruct", "target.safetensors", "--out", "net.safetensors"], work, env=env)
    verify = run(
        [env_dir / "bin" / "onlynorm", "verify", "net.safetensors", "target.safetensors", "--samples", "2000"],
        work,
        env=env,
    )
    return {"wheel": wheel.name, "sdist": sdists[0].name, "version": version, "location": location, "verify": verify}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    facts = check(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
    print(
        f"{facts['version']}: {facts['wheel']} and {facts['sdist']} install and run (imported from {facts['location']})"
    )
