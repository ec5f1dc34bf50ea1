"""One config for ``alignkit.PreferenceTrainer`` and ``alignkit train CONFIG.yaml [--key value]``.

Every key is a field of ``TrainConfig``; unknown keys, bad values and incompatible options raise
``ConfigError`` naming the key. YAML is read with ``yaml.safe_load``; ``--key value`` overrides are
parsed as YAML scalars (``--lr 1e-4``, ``--packing padding_free``, ``--loss_options '{beta: 0.2}'``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from alignkit.losses.registry import LOSSES as REGISTRY
from alignkit.ops.options import is_real

PACKINGS = ("padded", "padding_free", "shared_prompt")
# auto: flash_attention_2 where flash-attn can run (CUDA, installed), else varlen (alignkit.model.attention)
ATTN_IMPLEMENTATIONS = ("auto", "varlen", "flash_attention_2", "sdpa", "eager")
REFERENCES = ("precompute", "live", "none")
# dpo, simpo, cpo, orpo, kto (alignkit/losses/registry.py), and two that score no preference:
# reward (a scalar-head reward model, Bradley-Terry) and sft (the response tokens' NLL)
LOSSES = tuple(REGISTRY) + ("reward", "sft")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "cosine", "constant")
DATA_FORMATS = ("auto", "pairs", "messages", "sharegpt", "kto", "ranked", "sft")


_FLOATS = ("lr", "weight_decay", "eval_fraction", "max_grad_norm")
_PATHS = ("model", "tokenizer", "data", "eval_data", "reference_cache_dir")
_BOOLS = ("append_eos", "gradient_checkpointing", "tiled_mlp", "fsdp", "progress", "tensorboard")


def uses_reference(loss: str) -> bool:
    return loss in REGISTRY and REGISTRY[loss].reference


class ConfigError(ValueError):
    """A config key is unknown, out of range, or incompatible with another."""


@dataclass
class TrainConfig:
    # model: a local transformers directory, or none with model_config for a random init
    model: Optional[str] = None
    model_config: Optional[dict] = None      # e.g. {model_type: llama, hidden_size: 256, ...}
    tokenizer: Optional[str] = None          # a local tokenizer directory (default: model)
    # varlen / flash_attention_2: each sequence of a packed row attends to itself, with no mask
    # (alignkit/model/attention.py); sdpa / eager: masks (padding_free's is dense, [N, N])
    attn_implementation: str = "auto"
    # data
    data: Optional[str] = None               # .json / .jsonl path (or a datasets.Dataset in Python)
    eval_data: Optional[str] = None
    eval_fraction: float = 0.0               # held out from data when eval_data is not given
    data_format: str = "auto"
    max_length: int = 1024                   # prompt + response tokens per sequence
    max_prompt_length: int = 512
    append_eos: bool = True
    # objective
    loss: str = "dpo"
    loss_options: dict = field(default_factory=dict)   # beta, loss_type, gamma, ... (per loss)
    reference: str = "precompute"
    reference_cache_dir: Optional[str] = None  # default $ALIGNKIT_CACHE or ~/.cache/alignkit
    packing: str = "padding_free"            # 1.19-1.38x padded on real rows (bench/RESULTS.md)
    backend: str = "auto"                    # the log-prob op's backend
    engine: dict = field(default_factory=dict)  # alignkit.TileOptions' fields: memory, plan, ...
    # loop
    output_dir: str = "alignkit-out"
    seed: int = 0
    batch_size: int = 2                      # pairs (KTO: examples) per micro-batch per rank
    grad_accum: int = 1
    max_steps: int = 100                     # optimizer steps; the data order repeats per epoch
    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    max_grad_norm: Optional[float] = 1.0
    precision: str = "auto"                  # auto: bf16 autocast where the device has bf16
    gradient_checkpointing: bool = False
    tiled_mlp: bool = False                  # the MLP a chunk of tokens at a time (alignkit.model.tiled_mlp)
    fsdp: bool = False                       # FSDP2 (fully_shard) under torchrun; else DDP
    logging_steps: int = 1
    eval_steps: int = 0                      # 0: eval at the end only (when there is eval data)
    save_steps: int = 0                      # 0: checkpoint at the end only
    progress: bool = True
    tensorboard: bool = True                 # when tensorboard is installed

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Every field type-checked, every number finite and in range, the loss options checked
        by the loss itself: all before any model is built. Raises ConfigError naming the key."""
        # YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric strings for the float keys
        for k in _FLOATS:
            v = getattr(self, k)
            if isinstance(v, str):
                try:
                    setattr(self, k, float(v))
                except ValueError:
                    raise ConfigError(f"{k} must be a number; got {v!r}") from None
        for k in _PATHS:
            v = getattr(self, k)
            if isinstance(v, os.PathLike):
                setattr(self, k, os.fspath(v))
            elif v is not None and not isinstance(v, str):
                raise ConfigError(f"{k} must be a path (a string) or null; got {v!r}")
        for k in _BOOLS:
            v = getattr(self, k)
            if not isinstance(v, bool):
                raise ConfigError(f"{k} must be true or false; got {v!r}")
        for k in ("output_dir",):
            if not isinstance(getattr(self, k), str) or not getattr(self, k):
                raise ConfigError(f"{k} must be a non-empty string; got {getattr(self, k)!r}")

        def choice(key, options):
            if getattr(self, key) not in options:
                raise ConfigError(f"{key} must be one of {', '.join(options)}; got "
                                  f"{getattr(self, key)!r}")

        def positive(key, minimum=1):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(f"{key} must be an integer >= {minimum}; got {v!r}")

        def number(key, low, low_open, high=None, optional=False):
            v = getattr(self, key)
            if v is None and optional:
                return
            ok = is_real(v) and (v > low if low_open else v >= low) and (high is None or v < high)
            if not ok:
                rng = f"in [{low}, {high})" if high is not None else \
                    f"{'>' if low_open else '>='} {low}"
                raise ConfigError(f"{key} must be a finite number {rng}"
                                  f"{' or null' if optional else ''}; got {v!r}")

        choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        choice("packing", PACKINGS)
        choice("reference", REFERENCES)
        choice("loss", LOSSES)
        choice("precision", PRECISIONS)
        choice("lr_scheduler", SCHEDULES)
        choice("data_format", DATA_FORMATS)
        from alignkit.ops.options import BACKENDS
        choice("backend", BACKENDS)
        for k in ("max_length", "max_prompt_length", "batch_size", "grad_accum", "max_steps",
                  "logging_steps"):
            positive(k)
        for k in ("warmup_steps", "eval_steps", "save_steps", "seed"):
            positive(k, 0)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                              f"max_length ({self.max_length}) to leave room for a response")
        number("lr", 0, True)
        number("weight_decay", 0, False)
        number("eval_fraction", 0, False, high=1)
        number("max_grad_norm", 0, True, optional=True)
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ConfigError(f"model_config must be a mapping; got {self.model_config!r}")
        if not isinstance(self.loss_options, dict):
            raise ConfigError(f"loss_options must be a mapping; got {self.loss_options!r}")
        self.engine_options()
        if self.model is not None and self.model_config is not None:
            raise ConfigError("give model or model_config, not both")
        if not uses_reference(self.loss) and self.reference != "none":
            if self.reference != REFERENCES[0] or "reference" in self._explicit:
                raise ConfigError(f"loss {self.loss!r} is reference-free: set reference: none")
            self.reference = "none"
        if self.loss in ("kto", "sft") and self.packing == "shared_prompt":
            raise ConfigError(f"packing shared_prompt needs pairs; loss {self.loss} scores one "
                              "response per prompt (use padded or padding_free)")
        dense = self.attn_implementation in ("sdpa", "eager")
        if self.packing == "shared_prompt" and self.gradient_checkpointing and dense:
            raise ConfigError(f"packing shared_prompt with attn_implementation "
                              f"{self.attn_implementation} continues from the prompt's KV cache, "
                              "which gradient checkpointing turns off in training; use "
                              "attn_implementation auto or varlen (one row per pair, no cache)")
        if self.attn_implementation == "flash_attention_2":
            from alignkit.model.attention import flash_attn_missing
            why = flash_attn_missing()
            if why:
                raise ConfigError(f"attn_implementation flash_attention_2: {why}; use auto or "
                                  "varlen")
            if self.precision == "fp32":
                raise ConfigError("attn_implementation flash_attention_2 runs in bf16/fp16 only; "
                                  "set precision auto or bf16, or use varlen")
        # the loss's own options, checked by the loss code itself (same messages as a loss call)
        from alignkit.train.objective import check_loss_options
        try:
            check_loss_options(self.loss, self.loss_options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"loss_options: {e}") from None

    def engine_options(self):
        """The ``engine:`` section as alignkit.TileOptions (memory, plan, autotune and the tile
        budgets), reaching every fused call of the run; a bad key or value is a ConfigError."""
        from alignkit.ops.options import TileOptions
        if not isinstance(self.engine, dict):
            raise ConfigError(f"engine must be a mapping of TileOptions fields; got {self.engine!r}")
        fields = sorted(TileOptions.__dataclass_fields__)
        bad = sorted(set(self.engine) - set(fields))
        if bad:
            raise ConfigError(f"engine: unknown key(s) {bad}; valid: {', '.join(fields)}")
        try:
            return TileOptions(**self.engine)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"engine: {e}") from None

    def attention(self) -> str:
        """The transformers attn_implementation this config runs: sdpa, eager, or one of
        alignkit.model.attention's varlen names (auto: flash-attn's where it can run)."""
        from alignkit.model.attention import FLASH_VARLEN, VARLEN, flash_attn_missing, register
        a = self.attn_implementation
        if a in ("sdpa", "eager"):
            return a
        register()
        if a == "flash_attention_2" or (a == "auto" and flash_attn_missing() is None
                                        and self.precision != "fp32"):
            return FLASH_VARLEN
        return VARLEN

    def check_sources(self, need_model: bool = True, need_tokenizer: bool = True):
        """Where the model and the tokenizer come from, when the caller does not pass them."""
        if need_model and self.model is None and self.model_config is None:
            raise ConfigError("give model (a local transformers directory) or model_config "
                              "(a transformers config as a mapping, for a random init)")
        if need_tokenizer and self.model is None and self.tokenizer is None:
            raise ConfigError("give tokenizer (a local tokenizer directory): with model_config "
                              "there is no model directory to read one from")

    def check_paths(self, need_data: bool = True, need_model: bool = True,
                    need_tokenizer: bool = True):
        """The sources and files the config names exist (checked before any model is built)."""
        self.check_sources(need_model, need_tokenizer)
        checks = [("data", self.data, os.path.isfile)] if need_data else []
        checks += [("eval_data", self.eval_data, os.path.isfile)]
        if need_model:
            checks += [("model", self.model, os.path.isdir)]
        if need_tokenizer:
            checks += [("tokenizer", self.tokenizer, os.path.isdir)]
        if need_data and self.data is None:
            raise ConfigError("data: no training data (a .json or .jsonl path)")
        for key, path, ok in checks:
            if path is not None and not ok(path):
                kind = "file" if ok is os.path.isfile else "local directory (alignkit never " \
                    "downloads from a hub)"
                raise ConfigError(f"{key}: {path!r} is not a {kind}")

    _explicit: frozenset = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**values, _explicit=frozenset(values))

    @classmethod
    def from_yaml(cls, path: Optional[str], overrides: Optional[dict] = None) -> "TrainConfig":
        import yaml
        values: dict[str, Any] = {}
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} does not exist")
            try:
                with open(path) as f:
                    loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:   # safe_load refuses python/* tags: a config is data
                raise ConfigError(f"config file {path!r} is not plain YAML: "
                                  f"{' '.join(str(e).split())}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
            values.update(loaded)
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.startswith("_")}


def parse_overrides(args: list[str]) -> dict:
    """``["--lr", "1e-4", "--packing=padded"]`` -> {"lr": 1e-4, "packing": "padded"}."""
    import yaml
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"expected --key value, got {a!r}")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            raw = args[i + 1]
            i += 1
        try:
            out[key.replace("-", "_")] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--{key}: {raw!r} is not a plain YAML value "
                              f"({' '.join(str(e).split())})") from None
        i += 1
    return out
