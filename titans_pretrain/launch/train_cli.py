"""`titans-pretrain train CONFIG [key=value ...] [--nproc N]`.

Three ways to start, one code path: under `torchrun`/`srun` every process runs this with the
launcher's environment; with `--nproc N` this process becomes a small launcher (`launch/local.py`)
that starts N local ranks (each a fresh `python -m titans_pretrain train ...`), forwards
SIGTERM/SIGUSR1/SIGINT to them, stops the rest when one fails, and returns their exit code (0, 75 =
stopped by a signal after a save, 3 = diverged, 130 = interrupted before training started, otherwise
an error). The ranks die with the launcher if it is killed (`launch/launcher_watch.py`). Without
either, the trainer runs in this process.
"""
from __future__ import annotations

import argparse
import os
import sys

from titans_pretrain.config import SECTIONS, ConfigError, load_config, resolve_layout
from titans_pretrain.launch.local import launch_local


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sections = ", ".join(f"{name}.*" for name in SECTIONS)
    parser.epilog = (f"Overrides set any config key ({sections}, run_dir); `titans-pretrain config "
                     "CONFIG [overrides]` prints them all, resolved, with their meanings.")
    parser.add_argument("config", help="YAML run config (see configs/)")
    # REMAINDER so that `--nproc N` may also come after the overrides (pulled out in `run`)
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="dotted overrides, e.g. train.steps=10 run_dir=runs/x")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start N local processes (omit under torchrun/srun)")


def _split_nproc(args: argparse.Namespace) -> None:
    rest, it = [], iter(args.overrides)
    for item in it:
        if item == "--nproc":
            value = next(it, None)
            if value is None:
                raise ConfigError("--nproc needs a number")
            item = f"--nproc={value}"
        if item.startswith("--nproc="):
            try:
                args.nproc = int(item.split("=", 1)[1])
            except ValueError:
                raise ConfigError(f"--nproc must be an integer, got {item.split('=', 1)[1]!r}") from None
        elif item.startswith("-"):
            raise ConfigError(f"unknown option {item}; overrides look like section.key=value")
        else:
            rest.append(item)
    args.overrides = rest


def run(args: argparse.Namespace) -> int:
    from titans_pretrain.launch import launcher_watch

    launcher_watch.die_with_launcher()
    try:
        return _run(args)
    except KeyboardInterrupt:  # from the training loop on, Ctrl-C saves instead (train/signals.py)
        print("interrupted before training started: nothing to save yet", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from titans_pretrain.train import signals

    try:
        _split_nproc(args)
        if args.nproc is None:
            # A rank (under srun a time-limit or preemption signal may come while torch is still
            # importing): held for the trainer, which stops at its first step boundary with exit 75
            # instead of dying. Not in the --nproc launcher, which forwards signals to its ranks.
            signals.catch_early()
        cfg = load_config(args.config, args.overrides)
        if args.nproc is not None:
            if args.nproc < 1:
                raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
            resolve_layout(cfg, args.nproc)  # fail here, not in N processes
            if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("--nproc given inside a launched job (RANK is set): drop --nproc "
                                  "under torchrun/srun")
            return launch_local(args.nproc, [args.config, *args.overrides])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from titans_pretrain.train.trainer import train

    try:
        return train(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    finally:
        signals.ignore_stops()  # done or saved: a late signal must not fail the job
        from titans_pretrain.distributed.mesh import shutdown_distributed

        shutdown_distributed()
