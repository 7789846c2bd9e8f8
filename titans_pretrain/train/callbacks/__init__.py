"""Training callbacks: the trainer runs steps; these do the rest, each one job."""
from titans_pretrain.train.callbacks.base import Callback
from titans_pretrain.train.callbacks.checkpointing import Checkpointing
from titans_pretrain.train.callbacks.metrics import MetricSinks, StepMetrics
from titans_pretrain.train.callbacks.nonfinite import NonFiniteGuard, TrainingDiverged
from titans_pretrain.train.callbacks.preemption import Preemption
from titans_pretrain.train.callbacks.sampling import Sampling
from titans_pretrain.train.callbacks.validation import Validation

__all__ = ["Callback", "Checkpointing", "MetricSinks", "NonFiniteGuard", "Preemption", "Sampling",
           "StepMetrics", "TrainingDiverged", "Validation"]
