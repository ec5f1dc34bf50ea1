"""The thin preference trainer: config, data, packing, reference, loop (see PreferenceTrainer).

The public API, for users and for the layers above (``alignkit.rl``, ``alignkit.integrations``,
which import this package and not its modules; tests/test_layering.py checks it):

    PreferenceTrainer, TrainConfig, ConfigError      the loop and its config
    load_rows, prompt_of, Tokenise, Example, DataError   the dataset rows and their tokenisation
    collate, pad_id_of                               packing token rows into a batch
"""
from alignkit.train.config import ConfigError, TrainConfig
from alignkit.train.data import DataError, Example, Tokenise, load_rows, prompt_of
from alignkit.train.packing import collate, pad_id_of
from alignkit.train.trainer import PreferenceTrainer

__all__ = ["PreferenceTrainer", "TrainConfig", "ConfigError", "DataError", "Example", "Tokenise",
           "load_rows", "prompt_of", "collate", "pad_id_of"]
