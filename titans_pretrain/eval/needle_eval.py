"""Score a model on a needle grid (depth x context length) by streaming each sample.

A sample counts as retrieved when the model's argmax is right at every answer token (teacher
forced, which is the same as greedy decoding of the answer). Per cell we also keep the mean
per-token accuracy and the mean answer loss, which move before exact match does and so show
partial retrieval in small models.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from titans_pretrain.eval.needle import NeedleGenerator, NeedleSample
from titans_pretrain.eval.streaming import token_losses

__all__ = ["NeedleGrid", "evaluate_needles", "score_samples"]


@dataclass
class NeedleGrid:
    """Results of one task; every matrix is indexed ``[depth][length]``."""

    task: str
    lengths: list[int]
    depths: list[float]
    samples: int
    accuracy: list[list[float]]  # exact match of the whole answer
    token_accuracy: list[list[float]]
    answer_loss: list[list[float]]
    seed: int

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def mean_accuracy(self) -> float:
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / len(cells)


def score_samples(model, samples: list[NeedleSample], piece_len: int) -> tuple[list[bool], list[float], list[float]]:
    """(exact match, per-token accuracy, mean answer loss) for samples of one length."""
    if len({len(s.ids) for s in samples}) != 1:
        raise ValueError("score_samples needs samples of one length (they are stacked into a batch)")
    tokens = torch.tensor([s.ids for s in samples], dtype=torch.long)
    # Only the answer's predictions matter; the stream stops right after the last answer token.
    loss, correct = token_losses(model, tokens, piece_len)
    exact, tok_acc, ans_loss = [], [], []
    for i, s in enumerate(samples):
        sl = slice(s.answer_start - 1, len(s.ids) - 1)  # position t predicts token t + 1
        exact.append(bool(correct[i, sl].all()))
        tok_acc.append(correct[i, sl].float().mean().item())
        ans_loss.append(loss[i, sl].mean().item())
    return exact, tok_acc, ans_loss


def evaluate_needles(model, generator: NeedleGenerator, task: str, lengths: list[int], depths: list[float], *,
                     samples: int, piece_len: int, batch_size: int = 8, log=None) -> NeedleGrid:
    """Fill the ``depths x lengths`` grid of ``task`` with ``samples`` generated samples per cell."""
    shape = (len(depths), len(lengths))
    acc, tacc, aloss = ([[0.0] * shape[1] for _ in range(shape[0])] for _ in range(3))
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            cell = [generator.sample(task, length, depth, k) for k in range(samples)]
            results = ([], [], [])
            for b in range(0, samples, batch_size):
                for acc_list, values in zip(results, score_samples(model, cell[b:b + batch_size], piece_len)):
                    acc_list.extend(values)
            acc[i][j] = sum(results[0]) / samples
            tacc[i][j] = sum(results[1]) / samples
            aloss[i][j] = sum(results[2]) / samples
        if log is not None:
            row = " ".join(f"{acc[i][j]:.2f}" for i in range(len(depths)))
            log(f"[needle] {task} length {length:>7}: accuracy by depth {row}")
    return NeedleGrid(task=task, lengths=list(lengths), depths=list(depths), samples=samples, accuracy=acc,
                      token_accuracy=tacc, answer_loss=aloss, seed=generator.seed)
