"""Run configuration: structured schema, YAML composition + CLI overrides, validation."""
from .loader import ConfigError, load_config, save_config, to_yaml
from .schema import GRPOConfig
from .validate import validate

__all__ = ["ConfigError", "GRPOConfig", "load_config", "save_config", "to_yaml", "validate"]
