from __future__ import annotations

import os
import subprocess
import sys

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", "PYTHONPATH")}


def _check(env):
    return subprocess.run([sys.executable, "-m", "m2po", "check"], capture_output=True, text=True, env=env, cwd="/")


def test_check_passes_on_a_good_install():
    out = _check(CLEAN_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loss_mode=m2po: ok" in out.stdout and "verl 0.9.1" in out.stdout
    for mode in ("m2po_stale", "m2po_separate_async", "m2po_colocate_async"):
        assert f"trainer.v1.trainer_mode={mode}: ok" in out.stdout
    assert "start-up checks in verl's validate_config: ok" in out.stdout
    assert "CPU backend (entry point 'm2po_cpu', active only with VERL_PLATFORM=cpu): ok" in out.stdout


def test_check_fails_and_explains_when_plugins_are_disabled():
    out = _check(dict(CLEAN_ENV, VERL_USE_EXTERNAL_PLUGINS="none"))
    assert out.returncode == 1
    assert "loss_mode=m2po: MISSING" in out.stdout
    assert "VERL_USE_EXTERNAL_PLUGINS='none' excludes" in out.stdout


def test_config_dir_holds_the_trainer_config():
    out = subprocess.run([sys.executable, "-m", "m2po", "config-dir"], capture_output=True, text=True, env=CLEAN_ENV, cwd="/")
    assert os.path.isfile(os.path.join(out.stdout.strip(), "m2po_trainer.yaml"))
