"""Training configuration: the schema, loading with clear errors, and the generated parameter table."""

from trainer.config.load import ConfigError, load_config, parse_overrides, save_config
from trainer.config.schema import CONCEPT_MODES, TrainingConfig

__all__ = ["CONCEPT_MODES", "ConfigError", "TrainingConfig", "load_config", "parse_overrides", "save_config"]
