"""A `--nproc 2` run SIGKILLed again and again at random points (mid-step, mid-save, just after a
save), restarted each time, ends with the losses and weights of an uninterrupted run, bit for bit."""
import os
import random
import subprocess
import time
from pathlib import Path

import torch

from run_helpers import ROOT, env, final_weights, losses, train, train_cmd

ARGS = ("train.steps=16", "checkpoint.interval=2", "checkpoint.keep_last=2")


def _ranks_of(run_dir: Path) -> list[int]:
    """Live processes training into `run_dir` (the ranks outlive a SIGKILLed launcher by moments)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"run_dir={run_dir}".encode() in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def _wait_until_gone(run_dir: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _ranks_of(run_dir):
        assert time.monotonic() < deadline, f"ranks still alive: {_ranks_of(run_dir)}"
        time.sleep(0.1)


def test_sigkill_loop_under_two_ranks_matches_an_uninterrupted_run(tmp_path, data_dir):
    reference = tmp_path / "reference"
    train(reference, data_dir, *ARGS, nproc=2)
    run = tmp_path / "run"
    rng = random.Random(0)
    kills, mid_save, finished = 0, 0, False
    for _ in range(30):
        proc = subprocess.Popen(train_cmd(run, data_dir, *ARGS, nproc=2), env=env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        kill_after, delay = rng.randint(2, 4), rng.choice([0.0, 0.0, 0.02, 0.1, 0.3])
        seen, killed, log = 0, False, []
        for line in proc.stdout:
            log.append(line)
            if line.startswith("step ") and "|" in line:
                seen += 1
                if seen == kill_after:
                    time.sleep(delay)
                    proc.kill()  # the launcher; its ranks must die with it
                    killed = True
                    break
        proc.wait()
        _wait_until_gone(run)
        if not killed:
            assert proc.returncode == 0, "".join(log)[-3000:]
            finished = True
            break
        kills += 1
        mid_save += bool(list((run / "checkpoints").glob("*.tmp")))
    assert finished and kills >= 5, (kills, finished)
    print(f"{kills} SIGKILLs, {mid_save} of them during a save")
    assert losses(run) == losses(reference)  # every step logged once, identical floats
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
