"""Titans models: the memory core (`memory_ops`), the memory layer, attention, blocks and `TitansLM`."""
from titans_pretrain.models.titans import TitansConfig, TitansLM, TitansOutput, TitansState

__all__ = ["TitansConfig", "TitansLM", "TitansOutput", "TitansState"]
