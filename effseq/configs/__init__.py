"""Configs: every key with its default lives in :mod:`effseq.configs.base`."""

from effseq.configs.base import get_config, load_config, override, validate

__all__ = ["get_config", "load_config", "override", "validate"]
