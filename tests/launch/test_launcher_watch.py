"""Ranks of `train --nproc` die with a launcher that is killed outright, instead of training on as
orphans: through the kernel's parent-death signal, and through the polling fallback."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from run_helpers import ROOT, env, metrics, train_cmd  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ...


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (_stat(int(p.name)) or [None, None])[1] == str(pid)]


def _running(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended


def _all_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(map(_running, pids))


def test_ranks_die_with_a_sigkilled_launcher(tmp_path, data_dir):
    run = tmp_path / "run"
    launcher = subprocess.Popen(train_cmd(run, data_dir, "train.steps=100000", "checkpoint.interval=0",
                                          nproc=2), env=env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while not metrics(run) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert metrics(run), "training did not start"
        ranks = _children(launcher.pid)
        assert len(ranks) == 2 and all(map(_running, ranks))
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _all_gone(ranks, timeout_s=10), [_stat(p) for p in ranks]
    finally:  # no orphan outlives a failed test
        for pid in [launcher.pid, *ranks]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


POLLING_PARENT = """
import os, subprocess, sys, time
from titans_pretrain.launch import launcher_watch
child = '''
import time
from titans_pretrain.launch import launcher_watch
launcher_watch._set_parent_death_signal = lambda: False   # as on a system without prctl
launcher_watch.die_with_launcher(interval_s=0.1)
print('watching', flush=True)
time.sleep(60)
'''
env = dict(os.environ, **{launcher_watch.LAUNCHER_PID_ENV: str(os.getpid())})
proc = subprocess.Popen([sys.executable, '-c', child], env=env, stdout=subprocess.PIPE, text=True)
assert proc.stdout.readline().strip() == 'watching'
print(proc.pid, flush=True)
os._exit(0)   # the launcher vanishes without a word to its child
"""


def test_the_polling_fallback_ends_an_orphan(tmp_path):
    out = subprocess.run([sys.executable, "-c", POLLING_PARENT], env=env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _all_gone([int(out.stdout.split()[-1])], timeout_s=5)

