"""The thin preference trainer: config, data, packing, reference, loop (see PreferenceTrainer)."""
from alignkit.train.config import ConfigError, TrainConfig
from alignkit.train.data import DataError
from alignkit.train.trainer import PreferenceTrainer

__all__ = ["PreferenceTrainer", "TrainConfig", "ConfigError", "DataError"]
