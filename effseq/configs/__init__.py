"""Configs: every key with its default lives in :mod:`effseq.configs.base`."""

from effseq.configs.base import builtin_experiments, get_config, load_config, override, validate

__all__ = ["builtin_experiments", "get_config", "load_config", "override", "validate"]
