"""Run one experiment: ``python experiments/run.py +exp=NAME [key=value ...]``.

Experiments: cnn_readout, vit_probe, transfer, ddqn (configs/exp/). Sweeps: add ``-m`` and
comma-separated values (``seed=0,1,2``); ``hydra/launcher=joblib`` runs the jobs in parallel,
``hydra/launcher=submitit_local`` / ``slurm`` through submitit. Records land in results/runs/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from experiments.core.runner import run_experiment

    return run_experiment(cfg)


if __name__ == "__main__":
    main()
