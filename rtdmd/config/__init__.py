"""Typed params: ``load_params(name_or_path, overrides)`` is the one entry point."""
from rtdmd.config.loader import BACKBONES, load_params, params_path, params_hash
from rtdmd.config.schema import Params
from rtdmd.config.typed import ConfigError

__all__ = ["BACKBONES", "ConfigError", "Params", "load_params", "params_hash", "params_path"]
