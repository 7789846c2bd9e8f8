"""Bridges to other training stacks (optional extras; importing a submodule needs its extra)."""
