"""`launch slurm` without a cluster: the sbatch script of --dry-run, option checks, time formats."""
import sys
from pathlib import Path

import pytest

from titans_pretrain import cli
from titans_pretrain.config import ConfigError
from titans_pretrain.launch.slurm import SlurmOptions, signal_delay, time_minutes

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def launch(monkeypatch, capsys, *argv):
    argv = ["launch", "slurm", *argv]
    monkeypatch.setattr(sys, "argv", ["titans-pretrain", *argv])  # cli.main rewrites sys.argv
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_sbatch_script_and_writes_nothing(monkeypatch, capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = launch(
        monkeypatch, capsys, DEBUG, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
        "--time", "1-02:30:00", "--account", "proj", "--qos", "high", "--cpus-per-task", "8",
        "--mem", "200G", "--constraint", "h100", "--exclusive", "--job-name", "mac",
        "--dependency", "afterok:12", "--setup", "module load cuda", "--sbatch", "mail-type=END",
        f"run_dir={run_dir}", "--dry-run", "train.global_batch_tokens=1024",  # options after overrides too
        "--signal", "USR1@300", "--python", "apptainer exec --nv t.sif python")
    assert code == 0, err
    lines = set(out.splitlines())
    for flag in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--partition=gpu",
                 "--time=1590", "--account=proj", "--qos=high", "--cpus-per-task=8", "--mem=200G",
                 "--constraint=h100", "--exclusive", "--job-name=mac", "--dependency=afterok:12",
                 "--mail-type=END", "--signal=USR1@300", "--requeue", "--open-mode=append",
                 f"--chdir={Path.cwd()}", f"--output={run_dir}/slurm/%j_0_log.out"):
        assert f"#SBATCH {flag}" in lines, (flag, out)
    assert sum(line.startswith("#SBATCH --signal") for line in lines) == 1  # submitit's USR2 replaced
    setup = out.split("# setup\n")[1].splitlines()
    assert setup[:2] == ["unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT",
                         "module load cuda"]  # the submitting shell's rendezvous never leaks in
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and f"--output {run_dir}/slurm/%j_%t_log.out" in srun[0]  # per-rank logs
    assert srun[0].endswith(f"apptainer exec --nv t.sif python -u -m submitit.core._submit {run_dir}/slurm")
    assert not run_dir.exists()


def test_cpu_tasks_and_defaults(monkeypatch, capsys, tmp_path):
    code, out, err = launch(monkeypatch, capsys, "--dry-run", "--ntasks-per-node", "2", DEBUG,
                            f"run_dir={tmp_path}/r")
    assert code == 0, err
    lines = set(out.splitlines())
    assert {"#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=60",
            "#SBATCH --signal=USR1@120", "#SBATCH --job-name=titans-r"} <= lines, out
    assert not any("gpus" in line for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-node", "4", "--ntasks-per-node", "2"], "one task per GPU"),
    (["--time", "soon"], "not a Slurm time"),
    (["--signal", "TERM@60"], "USR1@SECONDS"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--time", "2", "--signal", "USR1@120"], "comes before the job has started"),
    (["--ntasks-per-node", "3"], "data-parallel size"),  # 8 sequences per step on 3 ranks
    (["model.colour=red"], "model.colour"),
])
def test_bad_options_fail_before_submitting(monkeypatch, capsys, tmp_path, argv, message):
    code, out, err = launch(monkeypatch, capsys, "--dry-run", DEBUG, f"run_dir={tmp_path}/r", *argv)
    assert code == 2 and message in err, err
    assert "config error" in err


def test_submitting_without_slurm_says_how(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    code, out, err = launch(monkeypatch, capsys, DEBUG, f"run_dir={tmp_path}/r")
    assert code == 2 and "login node" in err and "--dry-run" in err, err


def test_time_formats():
    assert [time_minutes(t) for t in ("30", "90:30", "2:00:00", "1-0", "1-2:30", "0-0:0:1")] == \
        [30, 91, 120, 1440, 1590, 1]
    assert signal_delay("USR1@90") == signal_delay("SIGUSR1@90") == 90
    with pytest.raises(ConfigError, match="positive"):
        time_minutes("0")
    assert SlurmOptions(gpus_per_node=8, nodes=4).world_size == 32


def test_what_follows_a_stop(tmp_path, monkeypatch):
    """Only the time-limit signal requeues, at most max_requeues times; failures are recorded."""
    import json
    import signal

    from titans_pretrain.launch.slurm import SlurmTrainTask

    task = SlurmTrainTask(DEBUG, [], str(tmp_path), max_requeues=2)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: a requeue attempt fails visibly
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    task._after_stop(signal.SIGTERM, "7")  # preemption / scancel / scontrol requeue: Slurm decides
    task._after_stop(signal.SIGUSR1, "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    task._after_stop(signal.SIGUSR1, "7")
    events = [json.loads(x) for x in (tmp_path / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["stopped", "requeue_failed", "not_requeued"]
    assert events[0]["signal"] == "SIGTERM" and "scontrol not found" in events[1]["error"]


def test_a_signal_before_the_trainer_starts_is_kept_for_it():
    """Slurm may signal while the ranks still import torch: `catch_early` (first thing in every
    Slurm task) holds the signal and the trainer's StopRequest starts out stopped with it."""
    import os
    import signal

    from titans_pretrain.train import signals

    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process without catch_early
        stop = signals.StopRequest()
        assert stop.received == signal.SIGUSR1 == signals.last_received
        stop.restore()
        assert signals.StopRequest().received is None  # held once, for the first StopRequest only
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        signals.last_received = None
