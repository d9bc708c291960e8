"""Reading values out of a composed OmegaConf config by dotted key (no verl import)."""

from __future__ import annotations

from omegaconf import OmegaConf


def config_value(config, key: str, default=None):
    """`config.<key>`, or `default` when the key is absent or null."""
    value = OmegaConf.select(config, key, default=default)
    return default if value is None else value
