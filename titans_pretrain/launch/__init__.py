"""Starting runs: `train` (`train_cli`: one rank under torchrun/srun, or `--nproc N` local ranks
through `local`, which die with their launcher by `launcher_watch`) and `launch slurm` (`slurm`:
submitit; preemption and requeue). The sbatch template and the local Slurm bring-up for tests live
in the repository's `launch/` folder."""
