"""On a real (local, one-node) Slurm: a 2-task training submitted through `launch slurm` is stopped
twice mid-run, by the time-limit warning (USR1: the job requeues itself) and by `scontrol requeue`
(SIGTERM: Slurm requeues), resumes each time from its checkpoint, and ends with the same losses,
bit for bit, as an uninterrupted run through the plain sbatch template (launch/titans.sbatch)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
STEPS = 30


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # sbatch exports it to the job


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _losses(run: Path) -> dict[int, float]:
    rows = [m for m in _lines(run / "metrics.jsonl") if "loss" in m]
    assert len({m["step"] for m in rows}) == len(rows), "a step was logged twice"
    return {m["step"]: m["loss"] for m in rows}


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def _wait(what: str, check, logs: Path, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                      for p in sorted(logs.glob("*")) if p.suffix in (".out", ".err", ".jsonl"))
    raise AssertionError(f"timed out waiting for {what}\nsqueue:\n{queue}\n{tails}")


def _requeued(job: str, run: Path) -> int:
    """Wait until the job is pending again, return the step it stopped at, then release it (a
    requeued job would otherwise wait ~2 minutes for its BeginTime)."""
    _wait(f"job {job} pending again", lambda: _job_state(job) == "PENDING", run / "slurm")
    stopped = max(_losses(run))
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    return stopped


@pytest.fixture
def data_dir(tmp_path):
    from titans_pretrain.data.prepare import prepare_dataset

    prepare_dataset(None, tmp_path / "data", vocab_size=512, seq_len=32, default_corpus_bytes=1 << 20,
                    progress=False)
    return tmp_path / "data"


@pytest.mark.slow
def test_launch_slurm_survives_requeues_with_nothing_lost(slurm_cluster, tmp_path, data_dir):
    args = [f"data.path={data_dir}", "train.sample_tokens=0", f"train.steps={STEPS}",
            "checkpoint.interval=3", "optim.warmup_steps=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference: the plain sbatch template, beside the launched job (oversubscribed)
    sbatch = subprocess.run(
        ["sbatch", "--parsable", "--oversubscribe", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--time=10", f"--output={tmp_path}/ref-%j.out", str(ROOT / "launch" / "titans.sbatch"),
         str(DEBUG), f"run_dir={ref}", *args],
        cwd=tmp_path, env=dict(_env(), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "ref-logs")),
        capture_output=True, text=True)
    assert sbatch.returncode == 0, sbatch.stderr
    ref_job = sbatch.stdout.strip().split(";")[0]
    jobs = [ref_job]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "titans_pretrain", "launch", "slurm", str(DEBUG), "--ntasks-per-node",
             "2", "--time", "10", "--sbatch", "oversubscribe", f"run_dir={run}", *args],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        logs = run / "slurm"
        job = (logs / "job_id").read_text().strip()
        jobs.append(job)
        assert f"submitted Slurm job {job}" in proc.stdout

        # 1) the time-limit warning (what --signal=USR1@120 delivers): checkpoint, requeue itself
        _wait("3 steps", lambda: len(_losses(run)) >= 3, logs)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        first_stop = _requeued(job, run)
        assert [e["event"] for e in _lines(logs / "events.jsonl")][-1] == "requeue"

        # 2) preemption / an admin's requeue: SIGTERM; Slurm requeues
        _wait("the resumed run to take 3 steps", lambda: max(_losses(run)) >= first_stop + 3, logs)
        subprocess.run(["scontrol", "requeue", job], check=True)
        second_stop = _requeued(job, run)

        _wait(f"job {job} to complete", lambda: _job_state(job) in ("COMPLETED", "FAILED", "GONE"), logs)
        assert _job_state(job) == "COMPLETED", (logs / f"{job}_0_log.err").read_text()[-3000:]
        _wait(f"reference job {ref_job}", lambda: _job_state(ref_job) in ("COMPLETED", "FAILED", "GONE"),
              tmp_path / "ref-logs")
        assert _job_state(ref_job) == "COMPLETED", (tmp_path / f"ref-{ref_job}.out").read_text()[-3000:]
    finally:
        for j in jobs:
            subprocess.run(["scancel", j], capture_output=True)

    assert 3 <= first_stop < second_stop < STEPS, (first_stop, second_stop)
    log0 = (logs / f"{job}_0_log.out").read_text()
    assert log0.count("[checkpoint] resumed from") == 2, log0[-3000:]
    assert f"resumed from {run}/checkpoints/step_{first_stop:08d}" in log0
    assert f"resumed from {run}/checkpoints/step_{second_stop:08d}" in log0
    events = _lines(logs / "events.jsonl")
    assert [e["event"] for e in events] == ["submitted", "start", "requeue", "start", "stopped", "start"]
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1, 2]
    assert events[1]["master"] == f"localhost:{20000 + int(job) % 20000}"
    assert (logs / f"{job}_1_log.out").exists()  # per-rank logs
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert _losses(run) == ref_losses  # nothing lost, nothing repeated: bit-exact
