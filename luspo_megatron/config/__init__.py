"""The run configuration: one tree of frozen dataclasses, loaded from YAML, then CLI flags.

Every field declares its flags (Megatron-LM names with short aliases, slime names for RL knobs),
its help text and its check in one place (``fields.py``); the argparse parser and the YAML loader
are generated from the fields (``loader.py``). Validation runs in ``__post_init__``, before any
process group exists, and raises :class:`~luspo_megatron.errors.ConfigError` with one line naming
the flag, the value and the rule. After validation a config never changes (``frozen=True``).

    cfg, args = load_config(["--config", "examples/tiny_cpu.yaml", "--tp", "2"])
    cfg.parallel.tensor_model_parallel_size  # 2

The sections: ``model.py`` (model, parallel), ``rollout.py``, ``training.py`` (algorithm,
optimizer), ``data.py``, ``eval.py``, ``run.py`` (checkpoint, logging, the root); ``loss.py`` holds the
policy-loss options the algorithm section validates; ``paths.py`` checks the files and directories
a config names (``validate_paths``, called by the CLI before any process group exists). Config is
a leaf of the house: it imports nothing of ours but ``errors``.
"""

from luspo_megatron.config.data import DataConfig
from luspo_megatron.config.eval import EvalConfig
from luspo_megatron.config.fields import flag_of, opt
from luspo_megatron.config.loader import (
    OneLineArgumentParser,
    build_parser,
    config_from_dict,
    config_to_yaml,
    json_ready,
    load_config,
    load_yaml,
    merge_overrides,
)
from luspo_megatron.config.loss import LossConfig
from luspo_megatron.config.model import ModelConfig, ParallelConfig
from luspo_megatron.config.paths import validate_paths
from luspo_megatron.config.rollout import RolloutConfig
from luspo_megatron.config.run import SECTIONS, CheckpointConfig, LoggingConfig, RunConfig
from luspo_megatron.config.training import AlgorithmConfig, OptimizerConfig

__all__ = [
    "SECTIONS", "AlgorithmConfig", "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig", "LossConfig",
    "ModelConfig", "OneLineArgumentParser", "OptimizerConfig", "ParallelConfig", "RolloutConfig", "RunConfig",
    "build_parser", "config_from_dict", "config_to_yaml", "flag_of", "json_ready", "load_config", "load_yaml",
    "merge_overrides", "opt", "validate_paths",
]
