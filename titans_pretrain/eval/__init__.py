"""Long-context evaluation: perplexity by position, needle-in-a-haystack grids, streaming over very
long inputs. The command is `titans-pretrain eval` (:mod:`titans_pretrain.eval.eval_cli`)."""
