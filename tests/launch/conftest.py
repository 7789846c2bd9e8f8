"""A real one-node Slurm for the launcher tests: `launch/local_slurm.sh start` (installs Slurm and
munge with apt-get when missing), stopped afterwards only if this session started it."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "local_slurm.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # no silent skip: CI must run these tests
        pytest.fail(f"could not start a local Slurm with {SCRIPT} start (exit {proc.returncode}):\n"
                    f"{proc.stderr.strip()}\nThese tests need root and Debian's slurmctld, slurmd, "
                    f"slurm-client and munge packages (apt-get install them, or run as root with a "
                    f"reachable package registry).", pytrace=False)
    started = proc.stdout.strip().splitlines()[-1:] == ["started"]
    yield
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=60)
