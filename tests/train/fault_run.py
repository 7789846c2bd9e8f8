"""`train` in one process with injected faults (tests only): python fault_run.py FAULTS_JSON ARGS...

FAULTS_JSON keys: "nan_steps": optimizer steps (1-based) whose loss is NaN; "kill_in_save_at": a
step whose checkpoint save is SIGKILLed after the shards are written, before it is finalized.
"""
import json
import os
import signal
import sys

from titans_pretrain.cli import main
from titans_pretrain.train import checkpoint
from titans_pretrain.train.engines import native as engine

faults = json.loads(sys.argv[1])
nan_steps = set(faults.get("nan_steps", []))
kill_at = faults.get("kill_in_save_at")

if nan_steps:
    calls = {"n": 0}
    original = engine.NativeEngine.train_step

    def train_step(self, micro_batches):
        calls["n"] += 1
        if calls["n"] in nan_steps:
            real_forward = self.forward_loss  # a NaN loss poisons the gradients too
            self.forward_loss = lambda batch: real_forward(batch) * float("nan")
            try:
                return original(self, micro_batches)
            finally:
                del self.forward_loss
        return original(self, micro_batches)

    engine.NativeEngine.train_step = train_step

if kill_at is not None:
    original_finalize = checkpoint.CheckpointManager._finalize

    def _finalize(self, tmp, final, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_finalize(self, tmp, final, step)

    checkpoint.CheckpointManager._finalize = _finalize

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[2:]]))
