"""titans_pretrain: distributed pretraining of Titans models (Behrouz et al. 2024)."""

__version__ = "0.1.0"


def load_checkpoint(path):
    """Load any checkpoint (any parallel layout) into one process as a `TitansLM`."""
    from titans_pretrain.train.checkpoint import load_checkpoint as _load

    return _load(path)
