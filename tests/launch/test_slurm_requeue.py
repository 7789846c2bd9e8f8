"""On a real (local, one-node) Slurm: a 2-task training submitted through `launch slurm` is stopped
twice mid-run, by the time-limit warning (USR1: the job requeues itself) and by `scontrol requeue`
(SIGTERM: Slurm requeues), resumes each time from its checkpoint, and ends with the same losses,
bit for bit, as an uninterrupted 2-rank run; so does a job of the plain sbatch template
(launch/titans.sbatch) stopped once by USR1."""
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


def _env(submit=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # sbatch exports it to the job
    if submit:  # a submitting shell with stale rendezvous variables: the jobs must not use them
        env.update(MASTER_ADDR="stale.invalid", MASTER_PORT="1", WORLD_SIZE="64")
    return env


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


def _node_busy_ending() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout
    return "completing" in out or not out.strip()


def _requeued(job: str, run: Path) -> int:
    """Wait until the job is pending again, return the step it stopped at, then release it early.

    Slurm holds a requeued job until BeginTime = now + CredExpire + 1 (~2 minutes) because slurmd
    refuses a launch credential created in the same second as the old run's revocation ("Job
    credential revoked", and the job ends FAILED). So release it only once slurmd has finished the
    old allocation (the node is no longer completing) and the clock has moved past that second."""
    _wait(f"job {job} pending again", lambda: _job_state(job) == "PENDING", run / "slurm")
    _wait(f"slurmd to finish job {job}'s old run", lambda: not _node_busy_ending(), run / "slurm")
    time.sleep(2.0)
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
    ref, run, plain = tmp_path / "ref", tmp_path / "run", tmp_path / "plain"
    # the uninterrupted reference: 2 local ranks, no Slurm, alongside
    reference = subprocess.Popen(
        [sys.executable, "-m", "titans_pretrain", "train", str(DEBUG), f"run_dir={ref}", *args, "--nproc", "2"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs = []
    try:
        # A: through `launch slurm` (submitit); B: the plain sbatch template. Both oversubscribe the
        # 2-CPU node so that they run side by side.
        proc = subprocess.run(
            [sys.executable, "-m", "titans_pretrain", "launch", "slurm", str(DEBUG), "--ntasks-per-node",
             "2", "--time", "10", "--sbatch", "oversubscribe", f"run_dir={run}", *args],
            cwd=ROOT, env=_env(submit=True), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        logs = run / "slurm"
        job = (logs / "job_id").read_text().strip()
        jobs.append(job)
        assert f"submitted Slurm job {job}" in proc.stdout
        (tmp_path / "plain-logs").mkdir()  # sbatch opens --output before the script runs
        sbatch = subprocess.run(
            ["sbatch", "--parsable", "--oversubscribe", "--ntasks-per-node=2", "--gpus-per-node=0",
             "--time=10", f"--output={tmp_path}/plain-logs/batch-%j.out",
             str(ROOT / "launch" / "titans.sbatch"), str(DEBUG), f"run_dir={plain}", *args],
            cwd=tmp_path, env=dict(_env(submit=True), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "plain-logs")),
            capture_output=True, text=True)
        assert sbatch.returncode == 0, sbatch.stderr
        plain_job = sbatch.stdout.strip().split(";")[0]
        jobs.append(plain_job)

        # 1) the time-limit warning (what --signal=USR1@120 delivers) to both: checkpoint, requeue itself
        _wait("3 steps", lambda: len(_losses(run)) >= 3, logs)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        _wait("3 steps of the template job", lambda: len(_losses(plain)) >= 3, tmp_path / "plain-logs")
        subprocess.run(["scancel", "--signal=USR1", plain_job], check=True)
        first_stop = _requeued(job, run)
        assert [e["event"] for e in _lines(logs / "events.jsonl")][-1] == "requeue"
        plain_stop = _requeued(plain_job, plain)

        # 2) preemption / an admin's requeue: SIGTERM; Slurm requeues
        _wait("the resumed run to take 3 steps", lambda: max(_losses(run)) >= first_stop + 3, logs)
        subprocess.run(["scontrol", "requeue", job], check=True)
        second_stop = _requeued(job, run)

        for j, folder in ((job, logs), (plain_job, tmp_path / "plain-logs")):
            _wait(f"job {j} to end", lambda: _job_state(j) in ("COMPLETED", "FAILED", "GONE"), folder)
            assert _job_state(j) == "COMPLETED", "".join(p.read_text()[-2000:] for p in folder.glob("*.*"))
        reference.communicate(timeout=120)
        assert reference.returncode == 0
    finally:
        reference.kill()
        for j in jobs:
            subprocess.run(["scancel", j], capture_output=True)

    assert 3 <= first_stop < second_stop < STEPS and 3 <= plain_stop < STEPS, (first_stop, second_stop)
    log0 = (logs / f"{job}_0_log.out").read_text()
    assert log0.count("[checkpoint] resumed from") == 2, log0[-3000:]
    assert f"resumed from {run}/checkpoints/step_{first_stop:08d}" in log0
    assert f"resumed from {run}/checkpoints/step_{second_stop:08d}" in log0
    events = _lines(logs / "events.jsonl")
    assert [e["event"] for e in events] == ["submitted", "start", "requeue", "start", "stopped", "start"]
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1, 2]
    assert events[1]["master"] == f"localhost:{20000 + int(job) % 20000}"
    assert (logs / f"{job}_1_log.out").exists()  # per-rank logs
    batch_log = (tmp_path / "plain-logs" / f"batch-{plain_job}.out").read_text()
    assert "requeueing job" in batch_log and "restart 1" in batch_log, batch_log
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert _losses(run) == ref_losses  # nothing lost, nothing repeated: bit-exact
    assert _losses(plain) == ref_losses
