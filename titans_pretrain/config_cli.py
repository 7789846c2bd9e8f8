"""`titans-pretrain config CONFIG [key=value ...]`: the run config a run would use, every key with
its meaning.

The meanings are the comments beside (or just above) each field in the config dataclasses, so they
live with the code they describe. The output is valid YAML: it can be saved and trained from.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys

import yaml

from titans_pretrain.config import SECTION_CLASSES, ConfigError, load_config

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_meanings(cls: type) -> dict[str, str]:
    """field name -> the comment on its line, or the comment lines right above it."""
    meanings, above = {}, []
    names = {f.name for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in names and m.group(1) not in meanings:
            meanings[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return meanings


def _yaml(value) -> str:
    """One value in YAML's flow style, as `yaml.safe_load` reads it back (1e-06 would be a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def render(cfg) -> str:
    """The resolved config as commented YAML."""
    out = []
    data = cfg.to_dict()
    for section, cls in SECTION_CLASSES.items():
        meanings = field_meanings(cls)
        out.append(f"{section}:")
        for key, value in data[section].items():
            meaning = meanings.get(key, "")
            out.append(f"  {key}: {_yaml(value)}" + (f"  # {meaning}" if meaning else ""))
    out.append(f"run_dir: {_yaml(data['run_dir'])}  # the run folder: config.yaml, metrics.jsonl, "
               "checkpoints/")
    return "\n".join(out) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML run config (omit for the defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.variant=mag")


def run(args: argparse.Namespace) -> int:
    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config:  # only overrides: the defaults plus them
        overrides.insert(0, config)
        config = None
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(cfg))
    return 0
