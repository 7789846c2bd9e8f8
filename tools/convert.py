"""Convert checkpoints between this project, Hugging Face and Megatron-core.

    python tools/convert.py to-hf        CHECKPOINT HF_DIR          # = titans-pretrain convert-hf
    python tools/convert.py from-hf      HF_DIR RUN_DIR [key=value ...]
    python tools/convert.py to-megatron  CHECKPOINT MEGATRON_DIR    # loads at any TP size
    python tools/convert.py from-megatron MEGATRON_DIR RUN_DIR CONFIG [key=value ...]

CHECKPOINT is a step folder, a checkpoints/ folder or a run folder (its newest intact checkpoint,
verified). A converted RUN_DIR holds `checkpoints/step_00000000` that `titans-pretrain train`
continues from (fresh optimizer, step 0). The Megatron directions need `megatron-core`
(docs/megatron.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("direction", choices=["to-hf", "from-hf", "to-megatron", "from-megatron"])
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("rest", nargs="*", help="from-megatron: CONFIG then overrides; from-hf: overrides")
    args = ap.parse_args()
    if args.direction in ("to-hf", "from-hf"):
        from titans_pretrain.cli import main as cli

        flags = ["--to-native"] if args.direction == "from-hf" else []
        return cli(["convert-hf", *flags, args.source, args.dest, *args.rest])
    from titans_pretrain.integrations import megatron_convert as mc

    from titans_pretrain import load_checkpoint

    try:
        if args.direction == "to-megatron":
            from titans_pretrain.train.checkpoint import checkpoint_config, resolve_checkpoint_path

            folder = resolve_checkpoint_path(args.source)
            mc.check_convertible(checkpoint_config(folder).model)  # before reading any weights
            model = load_checkpoint(folder)
            with mc.megatron_process():
                out = mc.save_megatron_checkpoint(model.state_dict(), model.config, args.dest)
            print(f"[convert] wrote {out}")
            return 0
        if not args.rest:
            ap.error("from-megatron needs the run config: MEGATRON_DIR RUN_DIR CONFIG [key=value ...]")
        folder = mc.megatron_checkpoint_to_run(args.source, args.dest, args.rest[0], overrides=args.rest[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # ConfigError is a ValueError
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"[convert] wrote {folder}; continue with: titans-pretrain train {args.dest}/config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
