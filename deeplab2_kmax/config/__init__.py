"""Experiment configs: loading (config.loader) and semantic validation (config.validation)."""

from deeplab2_kmax.config.loader import ConfigError
from deeplab2_kmax.config.loader import load_config
