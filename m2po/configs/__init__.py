"""The shipped hydra configs (they extend verl's `ppo_trainer`), and composing them in-process.

`config_dir()` is what `--config-path` takes (`m2po config-dir` prints it); `compose` gives the
config verl's `main_ppo` would see for the same config name and overrides, without running anything.
"""

from __future__ import annotations

import os


def config_dir() -> str:
    """Directory of the shipped hydra configs (for `--config-path`)."""
    return os.path.dirname(os.path.abspath(__file__))


def compose(config_name: str, overrides: list[str]):
    """The composed (unresolved) `DictConfig` of `config_name` with hydra `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
