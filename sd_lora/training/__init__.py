"""The engine behind train/style.py: config, data, loop, checkpoint, run_folder (who owns the output folder)."""

from sd_lora.training.config import ConfigError, TrainConfig, UsageError
from sd_lora.training.data import DatasetError

__all__ = ["ConfigError", "DatasetError", "TrainConfig", "UsageError", "train"]


def train(config: TrainConfig):
    """Run a training job (the loop is imported on first use, so configs and data load without it)."""
    from sd_lora.training.loop import train as run

    return run(config)
