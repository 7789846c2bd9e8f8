"""The trainer's loop contract: the order of the callbacks' hooks, early stops, counting, and that
`close` runs also after an error. The engine here is a stand-in that records its calls: the loop is
under test, and the real engines are run end to end by the other trainer tests."""
import contextlib

import pytest
import torch

from titans_pretrain.train.callbacks import Callback
from titans_pretrain.train.engines.base import StepResult
from titans_pretrain.train.trainer import Trainer, micro_batches


class RecordingEngine:
    def __init__(self, events, finite=lambda step: True):
        self.events, self.finite, self.calls = events, finite, 0

    def train_step(self, batch):
        self.calls += 1
        self.events.append(("train_step", batch[0]["i"]))
        return StepResult(loss=float(self.calls), grad_norm=1.0, finite=self.finite(self.calls), lr=0.1)


class Recorder(Callback):
    def __init__(self, name, events, stop_before=None, fail_after=None):
        self.name, self.events, self.stop_before, self.fail_after = name, events, stop_before, fail_after

    def on_start(self, trainer):
        self.events.append((self.name, "start", trainer.progress.step))

    def before_step(self, trainer):
        if self.stop_before is not None and trainer.progress.step == self.stop_before:
            return 75
        return None

    @contextlib.contextmanager
    def step_context(self, trainer):
        self.events.append((self.name, "enter", trainer.progress.step))
        yield
        self.events.append((self.name, "exit", trainer.progress.step))

    def after_step(self, trainer, result, batch):
        self.events.append((self.name, "after", trainer.progress.step, result.loss))
        if self.fail_after == trainer.progress.step:
            raise RuntimeError("boom")
        trainer.record({"step": trainer.progress.step, "by": self.name})

    def on_metrics(self, trainer, metrics):
        self.events.append((self.name, "metrics", metrics["by"]))

    def on_stop(self, trainer, code):
        self.events.append((self.name, "stop", trainer.progress.step, code))

    def on_end(self, trainer):
        self.events.append((self.name, "end", trainer.progress.step))

    def close(self, trainer):
        self.events.append((self.name, "close"))


def _trainer(events, callbacks, steps=2, finite=lambda step: True):
    stream = iter({"i": i} for i in range(100))
    return Trainer(RecordingEngine(events, finite), micro_batches(stream, 2), steps=steps, tokens_per_step=8,
                   callbacks=callbacks, device=torch.device("cpu"), log=lambda msg: None)


def test_hooks_run_in_order_around_each_step():
    events = []
    trainer = _trainer(events, [Recorder("a", events), Recorder("b", events)])
    assert trainer.fit() == 0
    step = [("a", "enter", 0), ("b", "enter", 0), ("train_step", 0), ("b", "exit", 0), ("a", "exit", 0),
            ("a", "after", 1, 1.0), ("a", "metrics", "a"), ("b", "metrics", "a"),
            ("b", "after", 1, 1.0), ("a", "metrics", "b"), ("b", "metrics", "b")]
    assert events[:2] == [("a", "start", 0), ("b", "start", 0)]
    assert events[2:13] == step
    assert events[13] == ("a", "enter", 1) and events[15] == ("train_step", 2)  # micro-batches 2, 3
    assert events[-4:] == [("a", "end", 2), ("b", "end", 2), ("b", "close"), ("a", "close")]
    assert (trainer.progress.step, trainer.progress.tokens) == (2, 16)


def test_a_stop_code_runs_every_on_stop_and_ends_the_run():
    events = []
    trainer = _trainer(events, [Recorder("a", events), Recorder("b", events, stop_before=1)], steps=5)
    assert trainer.fit() == 75
    assert trainer.engine.calls == 1
    assert events[-4:] == [("a", "stop", 1, 75), ("b", "stop", 1, 75), ("b", "close"), ("a", "close")]
    assert not any(e[1] == "end" for e in events if len(e) > 1)


def test_close_runs_after_an_error():
    events = []
    trainer = _trainer(events, [Recorder("a", events), Recorder("b", events, fail_after=1)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert events[-2:] == [("b", "close"), ("a", "close")]


def test_non_finite_steps_are_counted_in_a_row_and_in_all():
    events = []
    trainer = _trainer(events, [], steps=5, finite=lambda step: step not in (2, 3, 5))
    trainer.fit()
    p = trainer.progress
    assert (p.step, p.bad_in_a_row, p.skipped) == (5, 1, 3)
