"""Static checks of what no test machine can run: the Dockerfile (hadolint; no Docker engine here)
and the shell scripts of launch/ and bench/ (shellcheck; the Slurm tests run launch/'s too)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: pip install -e '.[lint]' (the dev extra includes it)", pytrace=False)
    return path


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "docker" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_scripts_pass_shellcheck():
    scripts = [ROOT / "launch" / "local_slurm.sh", ROOT / "launch" / "titans.sbatch", ROOT / "tools" / "gpu_session.sh"]
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, scripts)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_apptainer_definition_installs_what_the_dockerfile_does():
    """No apptainer here either: the two images must not drift (same base, same extras)."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    definition = (ROOT / "docker" / "titans.def").read_text()
    base = next(line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG BASE_IMAGE="))
    extras = next(line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG EXTRAS="))
    assert f"From: {base}" in definition
    assert f"[{extras}]" in definition
