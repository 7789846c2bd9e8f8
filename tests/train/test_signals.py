"""Ctrl-C stops like SIGTERM: the whole process group gets SIGINT (as from a terminal), the run
saves at the step it reached, exits 75 without a traceback, and the next run resumes there."""
import os
import signal
import subprocess
import time

from run_helpers import ROOT, env, losses, metrics, train, train_cmd


def test_ctrl_c_saves_exits_75_and_resumes(tmp_path, data_dir):
    run = tmp_path / "run"
    # a data worker too: it is in the terminal's process group and must not die of the Ctrl-C
    args = ["train.steps=1000", "checkpoint.interval=0", "data.num_workers=1"]
    proc = subprocess.Popen(train_cmd(run, data_dir, *args), env=env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(metrics(run)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    stopped = max(losses(run))
    assert 2 <= stopped < 1000
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    again = train(run, data_dir, *args, f"train.stop_at={stopped + 2}").stdout
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in again
    assert sorted(losses(run)) == list(range(1, stopped + 3))
