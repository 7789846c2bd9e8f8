"""The `titans-pretrain` command line: thin dispatch to the subcommand modules.

Each subcommand lives next to the code it drives and exposes `add_arguments(parser)` and
`run(args) -> int`; this file only wires them, so that `--help` stays cheap (modules import lazily).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported on use, so `--help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("titans_pretrain.data.prepare_cli", "text/jsonl/parquet -> tokenizer + webdataset shards + manifest"),
    "train": ("titans_pretrain.launch.train_cli", "pretrain a Titans model"),
    "convert-hf": ("titans_pretrain.hf.convert_cli", "checkpoint -> Hugging Face folder"),
    "profile": ("titans_pretrain.profile.profile_cli", "throughput report"),
    "plan": ("titans_pretrain.profile.plan", "memory per rank before launch, and what fits"),
    "launch": ("titans_pretrain.launch.launch_cli", "submit to Slurm through submitit"),
    "eval": ("titans_pretrain.eval.eval_cli", "long-context evaluation"),
    "config": ("titans_pretrain.config_cli", "print the resolved run config, each key with its meaning"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans-pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module_name)
        module = _load(module_name) if name in sys.argv[1:2] else None
        if module is not None:
            module.add_arguments(p)
        elif name in sys.argv[1:2]:
            p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help, or an unknown command: argparse says so
        parser.print_help()
        return 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = _load(module_name)
    if module is None:
        print(f"titans-pretrain {name}: not available in this installation (module {module_name} is "
              "missing).", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"titans-pretrain {name}", description=help_text)
    module.add_arguments(parser)
    try:  # options and key=value overrides in any order
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # a REMAINDER positional: that subcommand sorts its options out itself
        args = parser.parse_args(argv[1:])
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
