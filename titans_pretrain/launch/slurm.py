"""Submit `train` to Slurm through submitit; preemption and time limits come back on their own.

One Slurm task per GPU (on CPU: `ntasks_per_node` tasks), each task one rank running the trainer
in-process. Ranks find each other from the Slurm environment alone
(`titans_pretrain.distributed.mesh._env_from_slurm`: first host of the node list, port from the
job id). The run folder gets `slurm/`: the sbatch script, per-rank logs `<job>_<rank>_log.{out,err}`,
`job_id` and `events.jsonl` (every submission, start and requeue).

Requeue protocol (why not submitit's `checkpoint()`): submitit calls `checkpoint()` inside a signal
handler on rank 0 alone and exits at once, mid-step; a sharded checkpoint needs every rank at the
same step boundary. So the trainer owns the stop (`train/signals.py`: all ranks agree at a step
boundary, save, exit 75) and this module only decides what follows:
- SIGUSR1, sent by Slurm `--signal` seconds before the time limit: rank 0 runs
  `scontrol requeue $SLURM_JOB_ID` (bounded by `max_requeues`), and the job restarts later under
  the same id and resumes from `checkpoints/latest`;
- SIGTERM (preemption, `scontrol requeue`, `scancel`): Slurm already decided, so nothing more;
  a preempted or requeued job comes back and resumes, a cancelled one stays cancelled.
Either way the task leaves with `SystemExit(75)`, which submitit does not record as a result, so
the job counts as unfinished until a run ends with 0.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from titans_pretrain.config import ConfigError

DEFAULT_SIGNAL = "USR1@120"
# torch's rendezvous variables: derived from Slurm's in every task, never inherited from submission
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class SlurmOptions:
    """What `launch slurm` asks of Slurm; names follow sbatch's options."""

    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    partition: str | None = None
    time: str = "1:00:00"  # any sbatch --time format
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # sbatch --mem, e.g. 64G or 0 (all of the node)
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    dependency: str | None = None
    signal: str = DEFAULT_SIGNAL  # USR1@SECONDS before the time limit
    max_requeues: int = 20  # time-limit requeues before giving up (SLURM_RESTART_COUNT)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, ...)
    sbatch: dict[str, str | bool] = field(default_factory=dict)  # other sbatch options (True: a flag)
    python: str | None = None  # command that runs python on the nodes (e.g. `apptainer exec ...`)

    @property
    def tasks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self) -> None:
        for name in ("nodes", "max_requeues", "cpus_per_task", "ntasks_per_node"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and name != "max_requeues")):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.ntasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(f"--ntasks-per-node {self.ntasks_per_node} with --gpus-per-node "
                              f"{self.gpus_per_node}: the launcher runs one task per GPU; drop "
                              f"--ntasks-per-node")
        if signal_delay(self.signal) >= 60 * time_minutes(self.time):
            raise ConfigError(f"--signal {self.signal} comes before the job has started (--time "
                              f"{self.time}): the delay must leave time to train; lower it or "
                              f"raise --time")


def time_minutes(value: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"--time {value!r} is not a Slurm time (minutes, H:M:S or D-H:M:S)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = (nums + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + mi) * 60 + s
    elif len(nums) == 1:
        seconds = nums[0] * 60
    elif len(nums) == 2:
        seconds = nums[0] * 60 + nums[1]
    else:
        seconds = (nums[0] * 60 + nums[1]) * 60 + nums[2]
    if seconds <= 0:
        raise ConfigError(f"--time {value!r} must be positive")
    return -(-seconds // 60)


def signal_delay(value: str) -> int:
    """`USR1@SECONDS` -> SECONDS. Only USR1: the trainer checkpoints on it and the launcher requeues
    on it; SIGTERM also checkpoints but means preemption or scancel, where Slurm decides."""
    m = re.fullmatch(r"(?:SIG)?USR1@(\d+)", str(value).strip())
    if not m:
        raise ConfigError(f"--signal {value!r}: use USR1@SECONDS (seconds before the time limit at "
                          f"which the trainer checkpoints and the job requeues itself), e.g. "
                          f"{DEFAULT_SIGNAL}")
    return int(m.group(1))


def sbatch_parameters(opts: SlurmOptions, run_dir: Path, workdir: Path) -> dict:
    """submitit's `SlurmExecutor.update_parameters` arguments for these options."""
    extra = {"signal": f"USR1@{signal_delay(opts.signal)}",  # replaces submitit's USR2
             "requeue": True, "chdir": str(workdir)}
    if opts.mem is not None:
        extra["mem"] = opts.mem  # verbatim (submitit's own `mem` wants GB as a number)
    extra.update(opts.sbatch)
    params = {
        "job_name": opts.job_name or f"titans-{run_dir.name}",
        "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_node,
        "time": time_minutes(opts.time),
        "signal_delay_s": signal_delay(opts.signal),
        "additional_parameters": extra,
        # sbatch exports the submitting shell's environment: a RANK or MASTER_ADDR set there (a
        # shell inside another job, torchrun) would override what the tasks derive from Slurm.
        # The user's own --setup lines come after and may set them on purpose.
        "setup": [f"unset {' '.join(RANK_VARIABLES)}", *opts.setup],
    }
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
                "cpus_per_task": opts.cpus_per_task, "constraint": opts.constraint,
                "dependency": opts.dependency,
                "gpus_per_node": opts.gpus_per_node or None, "exclusive": opts.exclusive or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _executor(folder: Path, python: str | None, dry_run: bool):
    try:
        from submitit import SlurmExecutor
    except ImportError:
        raise ConfigError("launch slurm needs submitit: pip install 'titans-pretrain[slurm]' "
                          "(or use the plain sbatch template launch/titans.sbatch)") from None

    if dry_run:
        class DryRun(SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:  # build the script on a machine without srun too
                return 2
        return DryRun(folder, python=python)
    try:
        return SlurmExecutor(folder, python=python)
    except RuntimeError as exc:
        raise ConfigError(f"{exc}: `launch slurm` submits from a Slurm login node (sbatch and srun "
                          f"on PATH); --dry-run prints the script anywhere") from None


def _append_event(run_dir: Path, **record) -> None:
    folder = Path(run_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(folder / "events.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class SlurmTrainTask:
    """What every Slurm task runs (pickled by submitit): one rank of `titans-pretrain train`."""

    config: str
    overrides: list[str]
    run_dir: str
    max_requeues: int

    def __call__(self) -> int:
        from titans_pretrain.train import signals

        signals.catch_early()  # before torch is imported: a signal now must not kill the rank
        from titans_pretrain.config import load_config
        from titans_pretrain.distributed.mesh import _env_from_slurm
        from titans_pretrain.train.trainer import train

        _env_from_slurm()
        rank = int(os.environ.get("RANK", "0"))
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        if rank == 0:
            _append_event(Path(self.run_dir), event="start", job_id=job_id,
                          restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                          nodes=os.environ.get("SLURM_JOB_NODELIST"), world_size=os.environ.get("WORLD_SIZE"),
                          master=f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}")
        cfg = load_config(self.config, self.overrides)
        try:
            code = train(cfg)
        finally:
            signals.ignore_stops()  # done or saved: a late signal must not fail the job
            from titans_pretrain.distributed.mesh import shutdown_distributed

            shutdown_distributed()
        if code == 0:
            return 0
        if code == signals.EXIT_PREEMPTED:
            if rank == 0:
                self._after_stop(signals.last_received, job_id)
            sys.stdout.flush()
            raise SystemExit(code)  # not an Exception: submitit records no result, the job goes on
        raise RuntimeError(f"training exited with code {code} (3: diverged; see this rank's log)")

    def _after_stop(self, signum: int | None, job_id: str) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        name = signal.Signals(signum).name if signum else "a stop on another rank"
        if signum != signal.SIGUSR1:
            print(f"[slurm] checkpointed after {name}: preemption, scontrol requeue or scancel; "
                  f"Slurm requeues or ends the job", flush=True)
            _append_event(Path(self.run_dir), event="stopped", job_id=job_id, signal=name)
            return
        if restarts >= self.max_requeues:
            print(f"[slurm] time limit near, checkpoint saved; NOT requeued: already restarted "
                  f"{restarts} times (--max-requeues {self.max_requeues}). Submit again to go on.",
                  flush=True)
            _append_event(Path(self.run_dir), event="not_requeued", job_id=job_id, restarts=restarts)
            return
        # its own session: the requeue terminates this job's processes, possibly before scontrol
        # has returned; killed by a signal then means the controller took the request
        try:
            proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                  start_new_session=True)
            ok = proc.returncode == 0 or proc.returncode < 0
            error = None if ok else f"exit {proc.returncode}: {proc.stderr.strip()}"
        except FileNotFoundError:
            ok, error = False, "scontrol not found on PATH"
        print(f"[slurm] time limit near, checkpoint saved; scontrol requeue {job_id}: "
              f"{'done' if ok else 'FAILED, ' + error}", flush=True)
        _append_event(Path(self.run_dir), event="requeue" if ok else "requeue_failed", job_id=job_id,
                      restarts=restarts, error=error)


def submit(opts: SlurmOptions, config: str, overrides: list[str], *, dry_run: bool = False,
           workdir: str | os.PathLike | None = None) -> str:
    """Check the config for `opts.world_size` ranks, then submit (job id) or, with `dry_run`,
    return the sbatch script that would be submitted. Nothing is written on a dry run."""
    from titans_pretrain.config import load_config, resolve_layout

    opts.validate()
    workdir = Path(workdir or os.getcwd()).resolve()
    config_path = Path(config)
    if not config_path.is_absolute():
        config_path = (workdir / config_path).resolve()
    cfg = load_config(str(config_path), overrides)
    resolve_layout(cfg, opts.world_size)  # a layout error here, not after hours in the queue
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        run_dir = (workdir / run_dir).resolve()
    # the run_dir override last: the job finds the same folder whatever its working directory
    task = SlurmTrainTask(str(config_path), [*overrides, f"run_dir={run_dir}"], str(run_dir),
                          opts.max_requeues)
    folder = run_dir / "slurm"
    executor = _executor(folder, opts.python, dry_run)
    executor.update_parameters(**sbatch_parameters(opts, run_dir, workdir))
    if dry_run:
        return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
    job = executor.submit(task)
    (folder / "job_id").write_text(f"{job.job_id}\n")
    _append_event(run_dir, event="submitted", job_id=job.job_id, nodes=opts.nodes,
                  tasks_per_node=opts.tasks_per_node, config=str(config_path), overrides=overrides,
                  command=" ".join(shlex.quote(a) for a in sys.argv))
    return job.job_id
