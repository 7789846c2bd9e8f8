"""`titans-pretrain profile CONFIG [key=value ...] [--steps N --warmup N --profile-steps N
--out DIR --sweep-seq-len 128,256,...]`.

Runs in one process, or in every process of a `torchrun`/`srun` launch (any layout the engine
supports). Writes to `--out` (rank 0): `report.json`, `trace_T<seq_len>.pt.trace.json` (Chrome /
Perfetto / TensorBoard profile plugin), and with a sweep `sweep.png`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.variant=mag")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    parser.add_argument("--profile-steps", type=int, default=2,
                        help="steps run under torch.profiler for the breakdown and trace (default 2; 0 = none)")
    parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/profile)")
    parser.add_argument("--sweep-seq-len", default=None,
                        help="comma-separated sequence lengths, tokens per step kept fixed, e.g. 128,256,512; "
                             "in one process each length runs in a fresh process (clean peak memory)")
    parser.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # a sweep's child


def parse_lengths(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep-seq-len takes integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--sweep-seq-len needs positive lengths, got {text!r}")
    return values


def config_at_length(cfg, seq_len: int):
    """`cfg` at another sequence length with the same tokens per step (`train.global_batch_tokens`)
    and, where a sequence fits, per micro-batch; longer sequences take fewer per micro-batch and
    fewer micro-steps. A length that cannot keep the tokens per step is an error naming the fix."""
    from titans_pretrain.config import ConfigError, validate

    out = copy.deepcopy(cfg)
    tokens_micro = cfg.train.micro_batch_size * cfg.data.seq_len
    out.data.seq_len = seq_len
    out.train.micro_batch_size = max(1, tokens_micro // seq_len)
    if cfg.train.global_batch_tokens % (out.train.micro_batch_size * seq_len):
        raise ConfigError(f"--sweep-seq-len {seq_len}: {cfg.train.global_batch_tokens} tokens per step "
                          f"(train.global_batch_tokens) are not a whole number of {seq_len}-token "
                          "sequences; sweep lengths that divide it, or raise train.global_batch_tokens")
    validate(out)
    return out


def _sweep_in_fresh_processes(args: argparse.Namespace, lengths: list[int], out: Path) -> tuple[int, list]:
    """One child process per length: a process's peak memory (and allocator state) would otherwise
    carry the earlier, smaller lengths into the later ones."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            result = Path(tmp) / f"T{n}.json"
            cmd = [sys.executable, "-m", "titans_pretrain", "profile", args.config, *args.overrides,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps",
                   str(args.profile_steps), "--out", str(out), "--sweep-seq-len", str(n),
                   "--result-json", str(result)]
            code = subprocess.run(cmd).returncode
            if code:
                return code, []
            results.append(json.loads(result.read_text()))
    return 0, results


def _summary(r: dict) -> str:
    b = r["breakdown_s"]
    parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in b.items()
                      if isinstance(v, float) and k not in ("total", "profiled_step"))
    mfu = "n/a (device peak unknown)" if r["mfu"] is None else f"{r['mfu'] * 100:.2f}%"
    return (f"T={r['seq_len']}: {r['tokens_per_s']:,.0f} tokens/s total, "
            f"{r['tokens_per_s_per_device']:,.0f} per device, {r['step_time_s'] * 1e3:.1f} ms/step, "
            f"{r['flops_per_token']['total'] / 1e6:.2f} MFLOPs/token, MFU {mfu}, peak memory "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})"
            + (f"\n  breakdown per step ({b['basis']}): {parts} (a profiled step took "
               f"{b['profiled_step'] * 1e3:.1f} ms)" if b else ""))


def run(args: argparse.Namespace) -> int:
    from titans_pretrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        lengths = parse_lengths(args.sweep_seq_len)
        configs = [config_at_length(cfg, n) for n in lengths] or [cfg]
    except (ConfigError, ValueError) as exc:
        print(f"profile: {exc}", file=sys.stderr)
        return 2
    from titans_pretrain.distributed.mesh import shutdown_distributed
    from titans_pretrain.profile.runner import profile_config

    out = Path(args.out or Path(cfg.run_dir) / "profile")
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    log = print if rank_zero else (lambda msg: None)
    if len(configs) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        code, results = _sweep_in_fresh_processes(args, lengths, out)
        if code:
            return code
    else:
        results = []
        try:
            for i, c in enumerate(configs):
                trace = out / f"trace_T{c.data.seq_len}.pt.trace.json" if rank_zero else None
                r = profile_config(c, steps=args.steps, warmup=args.warmup, profile_steps=args.profile_steps,
                                   trace_path=trace, log=lambda m: log(m) or sys.stdout.flush()).to_dict()
                if i and r["peak_memory_kind"].startswith("rss"):  # the heap keeps earlier lengths' pages
                    r["peak_memory_kind"] += " (after earlier sweep lengths in this process)"
                results.append(r)
                log("[profile] " + _summary(results[-1]))
        except (ConfigError, ValueError) as exc:
            print(f"profile: {exc}", file=sys.stderr)
            return 2
        finally:
            shutdown_distributed()
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(results[0]))
        return 0
    if rank_zero:
        out.mkdir(parents=True, exist_ok=True)
        report = {"config": args.config, "overrides": list(args.overrides), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "flops_formula": "titans_pretrain/models/flops.py (module docstring)",
                  "breakdown_method": "record_function scopes installed on Attention/MemoryLayer/SwiGLU "
                                      "methods (profile/scopes.py); backward attributed by autograd "
                                      "sequence numbers; optimizer and collectives by torch's own ranges",
                  "results": results}
        if len(results) > 1:
            from titans_pretrain.profile.plots import plot_sweep

            png = plot_sweep(results, out / "sweep.png", f"{cfg.model.variant}, {results[0]['device']}")
            report["plot"] = str(png)
            log(f"[profile] plot: {png}")
        (out / "report.json").write_text(json.dumps(report, indent=2))
        log(f"[profile] report: {out / 'report.json'}")
    return 0
