"""Typed, validated run configuration (OmegaConf structured configs)."""

from degsr.config.loader import load_config, save_config, to_yaml, validate
from degsr.config.schema import Config

__all__ = ["Config", "load_config", "save_config", "to_yaml", "validate"]
