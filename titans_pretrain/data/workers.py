"""The process start method for data worker processes (tokenizer pool, DataLoader workers).

Forked children of a process that has run gloo collectives can deadlock (in our tests DataLoader
workers hung garbage-collecting objects inherited from the parent), so once torch is loaded the
workers come from a forkserver: a clean process that forks them cheaply. Its preload list is
shared by every user here, because the forkserver is one per process and keeps the list of
whoever starts it first.
"""
from __future__ import annotations

import multiprocessing
import sys

_PRELOAD = ["torch", "titans_pretrain.data.loader", "titans_pretrain.data.prepare"]


def worker_context(*, fork_without_torch: bool = False):
    """A forkserver context (spawn where it does not exist).

    `fork_without_torch`: plain fork when torch is not loaded (a `prepare` script): spawn and
    forkserver re-run an unguarded `__main__`, fork does not.
    """
    methods = multiprocessing.get_all_start_methods()
    if fork_without_torch and "torch" not in sys.modules and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context
