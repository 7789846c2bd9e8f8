"""`titans-pretrain convert-hf CHECKPOINT OUT_DIR` and, reversed, `convert-hf --to-native HF_DIR RUN_DIR`.

Forward: any native checkpoint (a step folder, a `checkpoints/` folder or a run folder; any parallel
layout, or DeepSpeed ZeRO) -> a Hugging Face folder, in one process. Reverse: an exported folder ->
`RUN_DIR/checkpoints/step_00000000`, from which `titans-pretrain train` continues training.
"""
from __future__ import annotations

import argparse
import sys

from titans_pretrain.hf.export import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint, checkpoints/ or run folder (with --to-native: an HF folder)")
    parser.add_argument("dest", help="output HF folder (with --to-native: the run folder to create)")
    parser.add_argument("overrides", nargs="*",
                        help="with --to-native: dotted run-config overrides, e.g. data.path=... train.steps=100")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weight dtype of the export (default float32, exact)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split model.safetensors into shards of at most this size (e.g. 2GB, 500MB)")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece .model to ship (default: the one of the run's dataset)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the model without a tokenizer")
    parser.add_argument("--prefill-chunk", type=int, default=2048,
                        help="tokens per piece when a long prompt is fed through the cache (bounds memory)")
    parser.add_argument("--to-native", action="store_true",
                        help="reverse: HF folder -> native checkpoint to continue training")
    parser.add_argument("--config", default=None,
                        help="with --to-native: run config YAML (default: the one recorded at export)")


def run(args: argparse.Namespace) -> int:
    from titans_pretrain.config import ConfigError

    try:
        if args.to_native:
            from titans_pretrain.hf.import_hf import hf_to_native

            folder = hf_to_native(args.source, args.dest, config_path=args.config, overrides=args.overrides)
            print(f"[convert-hf] wrote {folder}; continue training with: titans-pretrain train "
                  f"{args.dest}/config.yaml (add --nproc N or run under torchrun/srun)")
            return 0
        if args.overrides:
            raise ConfigError(f"unexpected arguments {args.overrides}: overrides apply only with --to-native")
        if args.no_tokenizer and args.tokenizer:
            raise ConfigError("--tokenizer and --no-tokenizer contradict each other: give one")
        if args.prefill_chunk < 1:
            raise ConfigError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
        from titans_pretrain.hf.export import convert_checkpoint

        out = convert_checkpoint(args.source, args.dest, tokenizer_file=args.tokenizer,
                                 with_tokenizer=not args.no_tokenizer,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size,
                                 prefill_chunk=args.prefill_chunk)
        print(f"[convert-hf] wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, "
              "trust_remote_code=True)")
        return 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"convert-hf: error: {exc}", file=sys.stderr)
        return 2
