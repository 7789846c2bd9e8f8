"""`titans-pretrain eval CHECKPOINT --task ppl needle streaming lm-eval [options]`.

Loads any checkpoint with `titans_pretrain.load_checkpoint` (one process), finds the run's
tokenizer and validation shards through the `data.path` of the checkpoint's `config.yaml` (or
`--data`), runs the tasks asked for, and writes `results.json` plus PNG figures to `--out`:

* `ppl`: perplexity at several context lengths and the per-position loss curve (`loss_by_position.png`);
* `needle`: pass-key / number / word needle grids, depth x length (`needle_<task>.png`);
* `streaming`: streams `--stream-tokens` tokens through the model state, reporting tokens/s, RSS
  (and CUDA peak memory) and state size along the way, to show memory stays flat;
* `lm-eval`: zero-shot tasks through lm-evaluation-harness on the Hugging Face export
  (`titans_pretrain.eval.harness`; the offline tasks of `titans_pretrain.eval.lm_eval_tasks` by default).

Every task streams its inputs piece by piece (`--piece-len`), so lengths are not bounded by memory.
`results.json` accumulates: each run merges its tasks into the file already in `--out` (see
:func:`merge_results`), so tasks run one at a time end up side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

TASK_NAMES = ("ppl", "needle", "streaming", "lm-eval")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step folder, a checkpoints/ folder or a run folder (newest complete)")
    parser.add_argument("--task", nargs="+", choices=TASK_NAMES, default=["ppl", "needle"],
                        help="what to run (default: ppl needle)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval/STEP)")
    parser.add_argument("--data", default=None,
                        help="prepared dataset (manifest.json folder) for the tokenizer and validation shards "
                             "(default: the checkpoint config's data.path)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the dataset's)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--piece-len", type=int, default=None,
                        help="tokens per streaming call (default: a multiple of the model's unit, <= 4096)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences evaluated together")
    parser.add_argument("--seed", type=int, default=0, help="needle generator seed")
    g = parser.add_argument_group("needle")
    g.add_argument("--needle-tasks", nargs="+", default=["passkey", "number", "word"],
                   help="passkey, number and/or word")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="needle context lengths in tokens")
    g.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths (0 = start of the haystack, 1 = right before the question)")
    g.add_argument("--samples", type=int, default=8, help="samples per (depth, length) cell")
    g = parser.add_argument_group("ppl")
    g.add_argument("--ppl-lengths", type=int, nargs="+", default=None,
                   help="context lengths (default: 1, 2, 4, 8 x the training seq_len, as far as the val split holds)")
    g.add_argument("--ppl-streams", type=int, default=8, help="validation streams to average over")
    g.add_argument("--split", default="val", help="dataset split for ppl")
    g = parser.add_argument_group("lm-eval")
    g.add_argument("--lm-eval-tasks", nargs="+", default=None,
                   help="lm-evaluation-harness task names (default: the shipped offline tasks titans_cloze "
                        "titans_stdlib_ppl titans_complete_line)")
    g.add_argument("--include-path", action="append", default=[],
                   help="a folder of lm-eval task YAMLs (repeatable); the shipped tasks are always included")
    g.add_argument("--limit", type=int, default=None, help="at most this many documents per lm-eval task")
    g = parser.add_argument_group("streaming")
    g.add_argument("--stream-tokens", type=int, default=1_000_000, help="tokens to stream")
    g.add_argument("--stream-batch", type=int, default=1, help="sequences streamed side by side")


class EvalError(RuntimeError):
    """A user-fixable problem (missing dataset, bad option); printed without a traceback."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _dataset_path(folder: Path, cfg, override: str | None) -> Path:
    """The dataset the run trained on: `--data`, else `data.path` as given (relative to the current
    folder), else relative to the folder the run was started from (inferred from `run_dir`)."""
    if override is not None:
        return Path(override)
    data = Path(cfg.data.path)
    if data.is_absolute() or (data / "manifest.json").is_file():
        return data
    run_dir = Path(cfg.run_dir)
    base = folder.resolve().parent.parent  # RUN_DIR/checkpoints/step_x -> RUN_DIR
    n = len(run_dir.parts)
    if not run_dir.is_absolute() and base.parts[-n:] == run_dir.parts:
        candidate = Path(*base.parts[:-n]) / data
        if (candidate / "manifest.json").is_file():
            return candidate
    return data


def _finite(obj):
    """NaN/inf -> None, so that results.json is strict JSON (a diverged model yields NaN losses)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def merge_results(old: dict | None, new: dict) -> dict:
    """``results.json`` after a run: ``new``'s entries on top of ``old``'s, at the finest level that
    is independent of the rest of a run (a perplexity length, a needle task, an lm-eval task), so
    separate runs add up; ``runs`` lists every run. The per-position curve and ``streaming`` are
    whole measurements: the newest replaces them."""
    if old is None:
        return dict(new, runs=list(new.get("runs", [])))
    merged = {**old, **{k: v for k, v in new.items() if k not in ("ppl", "needle", "lm_eval", "runs")}}
    merged["runs"] = list(old.get("runs", [])) + list(new.get("runs", []))
    for key in ("needle", "lm_eval"):
        if key in new:
            merged[key] = {**old.get(key, {}), **new[key]}
    if "ppl" in new:
        by_length = {**_ppl_by_length(old.get("ppl")), **_ppl_by_length(new["ppl"])}
        lengths = sorted(by_length, key=int)
        merged["ppl"] = dict(new["ppl"], lengths=[int(L) for L in lengths],
                             perplexity=[by_length[L]["perplexity"] for L in lengths],
                             mean_loss=[by_length[L]["mean_loss"] for L in lengths],
                             streams_by_length=[by_length[L]["streams"] for L in lengths])
    return merged


def _ppl_by_length(ppl: dict | None) -> dict[str, dict]:
    if not ppl:
        return {}
    streams = ppl.get("streams_by_length") or [ppl.get("streams")] * len(ppl["lengths"])
    return {str(L): {"perplexity": p, "mean_loss": m, "streams": n}
            for L, p, m, n in zip(ppl["lengths"], ppl["perplexity"], ppl["mean_loss"], streams)}


def _read_results(path: Path, checkpoint: str) -> dict | None:
    """The ``results.json`` already in the output folder (None if there is none), refused when it
    belongs to another checkpoint: merging would mix two models' numbers."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON ({exc}): move it away or pass another --out") from None
    if old.get("checkpoint") is None or Path(old["checkpoint"]).resolve() != Path(checkpoint).resolve():
        raise EvalError(f"{path} holds results of {old.get('checkpoint')!r}, not {checkpoint!r}: pass another "
                        "--out (results are merged into the file in --out)")
    return old


def _default_out(folder: Path) -> Path:
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "eval" / folder.name
    return Path("eval_results") / folder.name


def _run(args: argparse.Namespace) -> int:
    import torch

    from titans_pretrain.train.checkpoint import load_checkpoint
    from titans_pretrain.train.checkpoint import checkpoint_config, resolve_checkpoint_path

    try:
        folder = resolve_checkpoint_path(args.checkpoint)
    except FileNotFoundError as exc:
        raise EvalError(str(exc)) from None
    cfg = checkpoint_config(folder)
    device = _device(args.device)
    out = Path(args.out) if args.out else _default_out(folder)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    model = load_checkpoint(folder).to(device).eval()
    from titans_pretrain.eval.perplexity import attention_span
    from titans_pretrain.eval.streaming import default_piece_len

    c = model.config
    piece_len = args.piece_len or default_piece_len(model, args.batch_size)
    previous = _read_results(out / "results.json", str(folder))
    results: dict = {
        "checkpoint": str(folder), "device": str(device), "piece_len": piece_len,
        "runs": [{"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tasks": list(args.task),
                  "options": {k: v for k, v in sorted(vars(args).items())
                              if not k.startswith("_") and k != "command"}}],
        "model": {"variant": c.variant, "use_memory": c.use_memory, "params": model.num_params(),
                  "d_model": c.d_model, "n_layers": c.n_layers, "segment_len": c.segment_len,
                  "window": c.window, "chunk_size": c.chunk_size, "attention_span": attention_span(c),
                  "train_seq_len": cfg.data.seq_len},
    }
    log(f"[eval] {folder}: {c.variant}{'' if c.use_memory else ' (memory off)'}, "
        f"{model.num_params():,} parameters, attention span {attention_span(c)}, device {device}, "
        f"pieces of {piece_len} tokens -> {out}")

    manifest = tokenizer = None
    needs_tokenizer = "needle" in args.task or "lm-eval" in args.task
    if "ppl" in args.task or (needs_tokenizer and args.tokenizer is None):
        from titans_pretrain.data.manifest import load_manifest

        data = _dataset_path(folder, cfg, args.data)
        try:
            manifest = load_manifest(data)
        except FileNotFoundError as exc:
            raise EvalError(f"{exc}. The checkpoint's data.path is {cfg.data.path!r}; pass --data DIR "
                            f"(a prepared dataset) and/or --tokenizer FILE.model") from None
    if needs_tokenizer:
        from titans_pretrain.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer or manifest.tokenizer_path)
        if tokenizer.vocab_size > c.vocab_size:
            raise EvalError(f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} ids, the model only "
                            f"{c.vocab_size}: pass the tokenizer the checkpoint was trained with (--tokenizer)")

    figures = []
    if "ppl" in args.task:
        from titans_pretrain.eval.perplexity import evaluate_perplexity

        val_tokens = manifest.splits[args.split].samples * manifest.sample_len if args.split in manifest.splits else 0
        lengths = args.ppl_lengths or [cfg.data.seq_len * k for k in (1, 2, 4, 8)
                                       if cfg.data.seq_len * k + 1 <= val_tokens] or [cfg.data.seq_len]
        t0 = time.perf_counter()
        try:
            ppl = evaluate_perplexity(model, manifest, lengths, max_streams=args.ppl_streams, piece_len=piece_len,
                                      batch_size=args.batch_size, split=args.split)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        results["ppl"] = ppl.to_json() | {"seconds": time.perf_counter() - t0}
        for L, p in zip(ppl.lengths, ppl.perplexity):
            log(f"[ppl] context {L:>7}: perplexity {p:.3f}")
        inside = [l for (a, b), l in zip(ppl.bins, ppl.bin_loss) if b <= max(1, ppl.attention_span)]
        beyond = [l for (a, b), l in zip(ppl.bins, ppl.bin_loss) if a >= ppl.attention_span]
        if inside and beyond:
            log(f"[ppl] mean loss within the attention span {sum(inside) / len(inside):.3f}, "
                f"beyond it {sum(beyond) / len(beyond):.3f} ({ppl.streams} streams)")
        if ppl.first_nonfinite is not None:
            log(f"[ppl] WARNING: the loss is NaN/inf from position {ppl.first_nonfinite} on: the model's "
                f"streaming state overflowed there (inspect the memory weights; the JSON holds null)")
        figures.append(("loss_by_position.png", "curve", ppl))

    if "needle" in args.task:
        from titans_pretrain.eval.needle import NeedleGenerator
        from titans_pretrain.eval.needle_eval import evaluate_needles

        gen = NeedleGenerator(tokenizer, seed=args.seed)
        results["needle"] = {}
        for task in args.needle_tasks:
            t0 = time.perf_counter()
            try:
                grid = evaluate_needles(model, gen, task, args.lengths, args.depths, samples=args.samples,
                                        piece_len=piece_len, batch_size=args.batch_size, log=log)
            except ValueError as exc:  # e.g. too few vocabulary words for the word task
                log(f"[needle] {task}: skipped ({exc})")
                results["needle"][task] = {"skipped": str(exc)}
                continue
            results["needle"][task] = grid.to_json() | {"mean_accuracy": grid.mean_accuracy,
                                                        "seconds": time.perf_counter() - t0}
            log(f"[needle] {task}: mean accuracy {grid.mean_accuracy:.3f}")
            figures.append((f"needle_{task}.png", "heatmap", grid))

    if "lm-eval" in args.task:
        from titans_pretrain.eval.harness import run_lm_eval
        from titans_pretrain.eval.lm_eval_tasks import TASK_NAMES as SHIPPED, write_tasks

        shipped = out / "lm_eval" / "tasks"
        write_tasks(shipped)
        t0 = time.perf_counter()
        try:
            results["lm_eval"] = run_lm_eval(
                model, tokenizer.model_file, args.lm_eval_tasks or list(SHIPPED),
                work_dir=out / "lm_eval", trained_context=cfg.data.seq_len,
                include_paths=[shipped, *args.include_path], batch_size=args.batch_size, limit=args.limit,
                device=str(device), log=log)
        except (ImportError, ValueError) as exc:
            raise EvalError(str(exc)) from None
        log(f"[lm-eval] {time.perf_counter() - t0:.1f} s")

    if "streaming" in args.task:
        from dataclasses import asdict

        from titans_pretrain.eval.streaming import stream_benchmark

        total = args.stream_tokens
        marks = sorted({total * k // 8 for k in range(1, 9)} - {0})
        torch.manual_seed(args.seed)
        points = stream_benchmark(model, total, piece_len, marks, batch=args.stream_batch, seed=args.seed, log=log)
        results["streaming"] = {"tokens": total, "batch": args.stream_batch, "points": [asdict(p) for p in points]}

    results = merge_results(previous, _finite(results))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(out / "results.json")
    from titans_pretrain.eval.plots import MISSING, have_matplotlib, plot_loss_curve, plot_needle_heatmap

    if figures and not have_matplotlib():
        log(f"[eval] {MISSING}")
    elif figures:
        name = f"{c.variant}{'' if c.use_memory else ' (memory off)'}"
        for filename, kind, obj in figures:
            if kind == "heatmap":
                plot_needle_heatmap(obj, out / filename, title=f"{name} {obj.task}: exact match, "
                                                                f"{obj.samples} samples/cell")
            else:
                plot_loss_curve(obj, out / filename, title=f"{name}: loss by position")
    log(f"[eval] wrote {out / 'results.json'}" + (f" and {len(figures)} figure(s)" if figures else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        print(f"eval: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    missing = [p for p in args.include_path if not Path(p).is_dir()]
    if missing:
        print(f"eval: --include-path {missing[0]} is not a folder (of lm-eval task YAMLs)", file=sys.stderr)
        return 2
    for name in ("samples", "batch_size", "ppl_streams", "stream_tokens", "stream_batch"):
        if getattr(args, name) < 1:
            print(f"eval: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    from titans_pretrain.eval.needle import TASKS

    unknown = [t for t in args.needle_tasks if t not in TASKS]
    if unknown:
        print(f"eval: unknown --needle-tasks {unknown}; choose from {sorted(TASKS)}", file=sys.stderr)
        return 2
    if args.piece_len is not None and args.piece_len < 1:
        print(f"eval: --piece-len must be >= 1, got {args.piece_len}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except EvalError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
