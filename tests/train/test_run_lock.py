"""The run-folder lock: a second job on one run_dir is refused, by every rank, before it writes
anything; the lock of a job that was killed is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from run_helpers import ROOT, env, train
from titans_pretrain.train.run_lock import RunLock, RunLockError

HOLD = "import sys, time; from titans_pretrain.train.run_lock import RunLock; " \
       "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockError) as refused:
        RunLock(tmp_path).acquire()
    assert (f"run_dir {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()} since "
            in str(refused.value))
    assert "wait for it or pick another run_dir; if that process is gone, the lock is stale" in str(refused.value)
    first.release()
    again = RunLock(tmp_path, log=pytest.fail)  # released in order: free, and nothing to take over
    again.acquire()
    again.release()


def test_the_lock_of_a_killed_job_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockError, match=f"in use by pid {holder.pid} "):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    lock = RunLock(tmp_path, log=said.append)
    lock.acquire()
    assert len(said) == 1 and f"taking over the stale lock {tmp_path / '.lock'} of pid {holder.pid} " in said[0]
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("nproc", [None, 2])
def test_train_refuses_a_run_dir_in_use_before_writing(tmp_path, data_dir, nproc):
    """Every rank of the second job gets rank 0's refusal (none waits for it), and nothing is written."""
    held = RunLock(tmp_path / "run")
    held.acquire()
    proc = train(tmp_path / "run", data_dir, nproc=nproc, check=False, timeout=120)
    held.release()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count(f"error: run_dir {tmp_path / 'run'} is in use by pid {os.getpid()}") == 1
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
