"""Launchers for clusters: `slurm` (submitit; preemption and requeue). The sbatch template and the
local Slurm bring-up for tests live in the repository's `launch/` folder."""
