"""Metric sinks: console progress line, `metrics.jsonl`, TensorBoard, wandb. Rank 0 only.

Each sink is optional and has the same two methods, so the trainer logs one dict and never knows
which sinks exist. A sink whose package is missing fails at start-up with the install command,
not at the first log call hours later.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from titans_pretrain.config import RunConfig


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleLogger:
    def __init__(self, total_steps: int, stream=None):
        self.total = total_steps
        self.stream = stream or sys.stdout

    def log(self, m: dict[str, Any]) -> None:
        if "val_loss" in m and "loss" not in m:
            print(f"step {m['step']:>6} | val_loss {m['val_loss']:.4f}", file=self.stream, flush=True)
            return
        mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
        tps = m.get("tokens_per_s") or 0.0
        eta = (self.total - m["step"]) * m.get("step_time", float("nan"))
        cp = "" if m.get("cp_idle") is None else f" | cp idle {m['cp_idle']:.2f}"
        norms = [v for k, v in m.items() if k.startswith("memory_weight_norm_max/")]
        mem = f" | mem |W| {max(norms):.3g}" if norms else ""
        print(f"step {m['step']:>6}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
              f"gnorm {m['grad_norm']:.3f}{mem} | {tps:,.0f} tok/s | mfu {mfu}{cp} | eta {_fmt_duration(eta)}",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


def drop_torn_tail(path: Path, block: int = 1 << 16) -> int:
    """Cut a last line that lacks its newline (a writer killed mid-line) so that the next line
    starts on a line of its own and the file parses; returns the bytes cut."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = end = f.seek(0, 2)
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
    return size - keep


class JsonlLogger:
    def __init__(self, path: Path):
        torn = drop_torn_tail(path)
        if torn:
            print(f"[metrics] dropped the torn last line of {path} ({torn} bytes, a run killed mid-write)",
                  flush=True)
        self.f = open(path, "a", buffering=1)

    def log(self, m: dict[str, Any]) -> None:
        self.f.write(json.dumps(m) + "\n")

    def close(self) -> None:
        self.f.close()


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("logging.tensorboard=true needs the tensorboard package: "
                               "pip install 'titans-pretrain[logging]' (or set logging.tensorboard=false)"
                               ) from exc
        self.w = SummaryWriter(str(log_dir))

    def log(self, m: dict[str, Any]) -> None:
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.w.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, m["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbLogger:
    def __init__(self, cfg: RunConfig, run_dir: Path, mode: str):
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError(f"logging.wandb={mode} needs wandb: pip install 'titans-pretrain[logging]' "
                               "(or set logging.wandb=disabled)") from exc
        self.run = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name,
                              dir=str(run_dir), mode=mode, config=cfg.to_dict(), resume="allow",
                              id=(cfg.logging.run_name or run_dir.name).replace("/", "_"))

    def log(self, m: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in m.items() if v is not None and k != "step"}, step=m["step"])

    def close(self) -> None:
        self.run.finish()


class MetricLoggers:
    def __init__(self, cfg: RunConfig, run_dir: Path, total_steps: int, enabled: bool):
        self.sinks: list = []
        if not enabled:
            return
        if cfg.logging.console:
            self.sinks.append(ConsoleLogger(total_steps))
        self.sinks.append(JsonlLogger(run_dir / "metrics.jsonl"))
        if cfg.logging.tensorboard:
            self.sinks.append(TensorBoardLogger(run_dir / "tensorboard"))
        if cfg.logging.wandb != "disabled":
            self.sinks.append(WandbLogger(cfg, run_dir, cfg.logging.wandb))

    def log(self, m: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(m)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class Throughput:
    """Tokens/s over the steps since the last log line (wall clock, so it includes everything)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def read(self) -> tuple[float, float]:
        dt = time.perf_counter() - self.t0
        tps = self.tokens / dt if dt > 0 else 0.0
        step_time = dt / max(1, self.steps)
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0
        return tps, step_time
