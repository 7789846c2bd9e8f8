"""`titans-pretrain launch slurm CONFIG [key=value ...] --nodes N --gpus-per-node G ...`.

Submits `train` through submitit: one task per GPU, rendezvous from the Slurm environment, the
job id, the sbatch script and per-rank logs in `RUN_DIR/slurm/`; before the time limit (`--signal`)
or on preemption the trainer checkpoints and the job comes back and resumes by itself
(the protocol: `titans_pretrain/launch/slurm.py`). `--dry-run` prints the sbatch script only.
"""
from __future__ import annotations

import argparse
import sys

from titans_pretrain.config import ConfigError


def _key_value(text: str) -> tuple[str, str | bool]:
    key, sep, value = text.partition("=")
    key = key.lstrip("-")
    if not key:
        raise argparse.ArgumentTypeError(f"--sbatch wants KEY=VALUE or a flag KEY (e.g. mail-type=END, "
                                         f"oversubscribe), got {text!r}")
    return key, value if sep else True


def _options(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The launcher's options; `defaults=False` leaves unset ones out (for the second pass in `run`)."""
    def d(value):
        return value if defaults else argparse.SUPPRESS

    g = p.add_argument_group("resources (sbatch options of the same name)")
    g.add_argument("--nodes", type=int, default=d(1))
    g.add_argument("--gpus-per-node", type=int, default=d(0), help="one task (rank) per GPU")
    g.add_argument("--ntasks-per-node", type=int, default=d(None),
                   help="tasks per node without GPUs (CPU runs); default: --gpus-per-node, or 1")
    g.add_argument("--partition", default=d(None))
    g.add_argument("--time", default=d("1:00:00"), help="time limit per run of the job (default 1:00:00)")
    g.add_argument("--account", default=d(None))
    g.add_argument("--qos", default=d(None))
    g.add_argument("--cpus-per-task", type=int, default=d(None))
    g.add_argument("--mem", default=d(None), help="memory per node, e.g. 64G (0: all)")
    g.add_argument("--constraint", default=d(None))
    g.add_argument("--exclusive", action="store_true", default=d(False))
    g.add_argument("--job-name", default=d(None))
    g.add_argument("--dependency", default=d(None), help="e.g. afterok:1234")
    g.add_argument("--sbatch", type=_key_value, action="append", default=d([]), metavar="KEY[=VALUE]",
                   help="any other sbatch option (repeatable): --sbatch mail-type=END, --sbatch oversubscribe")
    r = p.add_argument_group("preemption and environment")
    r.add_argument("--signal", default=d("USR1@120"),
                   help="USR1@SECONDS: checkpoint this long before the time limit, then requeue")
    r.add_argument("--max-requeues", type=int, default=d(20),
                   help="time-limit requeues before the job stops requeueing itself (default 20)")
    r.add_argument("--setup", action="append", default=d([]), metavar="SHELL_LINE",
                   help="a line run before srun (repeatable), e.g. 'module load cuda'")
    r.add_argument("--python", default=d(None), help="command running python on the nodes (default: "
                   "this interpreter), e.g. 'apptainer exec --nv titans.sif python'")
    r.add_argument("--dry-run", action="store_true", default=d(False),
                   help="print the sbatch script, submit nothing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="backend", metavar="BACKEND", required=True)
    p = sub.add_parser("slurm", help="submit to Slurm through submitit",
                       description="Submit `train` to Slurm through submitit: one task per GPU, "
                       "checkpoint + requeue + resume on preemption or time limit (docs/slurm.md).")
    p.add_argument("config", help="YAML run config (see configs/)")
    # REMAINDER: options may also follow the overrides (sorted out in `run`)
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="dotted overrides, e.g. train.steps=1000 run_dir=runs/x")
    _options(p)


def _options_after_config(args: argparse.Namespace) -> None:
    """`launch slurm CONFIG k=v --nodes 2 k=v`: parse the options mixed into the overrides."""
    if not any(item.startswith("-") for item in args.overrides):
        return
    late = argparse.ArgumentParser(prog="titans-pretrain launch slurm CONFIG")
    late.add_argument("overrides", nargs="*")
    _options(late, defaults=False)
    vars(args).update(vars(late.parse_intermixed_args(args.overrides)))


def _print_plan(args: argparse.Namespace, opts) -> None:
    """The memory plan per rank for the job's ranks (docs/parallelism.md, "Memory plan"); a config
    error is left to `submit`, which reports it."""
    from titans_pretrain.config import load_config
    from titans_pretrain.profile.plan import format_plan, memory_plan

    try:
        opts.validate()
        cfg = load_config(args.config, args.overrides)
        plan = memory_plan(cfg, opts.world_size, "cuda" if opts.gpus_per_node else "cpu")
    except (ConfigError, OSError):
        return
    print(format_plan(plan), flush=True)


def run(args: argparse.Namespace) -> int:
    from titans_pretrain.launch.slurm import SlurmOptions, submit

    _options_after_config(args)
    opts = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
        partition=args.partition, time=args.time, account=args.account, qos=args.qos,
        cpus_per_task=args.cpus_per_task, mem=args.mem, constraint=args.constraint,
        exclusive=args.exclusive, job_name=args.job_name, dependency=args.dependency,
        signal=args.signal, max_requeues=args.max_requeues, setup=args.setup,
        sbatch=dict(args.sbatch), python=args.python)
    _print_plan(args, opts)
    try:
        out = submit(opts, args.config, args.overrides, dry_run=args.dry_run)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(out)
    else:
        print(f"submitted Slurm job {out}; logs and job id in the run folder's slurm/ "
              f"(squeue -j {out}; scancel {out})")
    return 0
