"""Throughput profiling of the real training step: `titans-pretrain profile` (see docs/profile.md)."""
