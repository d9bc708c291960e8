"""The package's layering, read from the source: no module imports from a layer above it, and the
bottom layer never imports verl. (A static walk over every import statement, those inside
functions included, so a lazy import cannot hide a dependency.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "m2po")

# Lower numbers are lower layers. A unit may import from its own unit and from lower layers only;
# two units of one layer are independent of each other.
LAYERS = {
    # plain PyTorch / Python: helpers, the algorithm, the stale@k buffer
    "utils": 0,
    "algorithm": 1,
    "buffer": 1,
    # verl integration: the plugin, its configs, reward and datasets
    "configs": 2,
    "verl_integration": 2,
    "reward": 2,
    "data": 2,
    # applications built on it: verl on CPU, the embedded testbed
    "cpu_backend": 3,
    "testbed": 3,
    # command-line tools
    "dry_run": 4,
    "selfcheck": 4,
    "report": 4,
    "gpu_check": 5,  # runs selfcheck's probe and the CPU backend's tiny task on a GPU
    "cli": 6,
    "__main__": 7,
}
VERL_FREE = {"utils", "algorithm", "buffer"}
VERL_PACKAGES = {"verl", "ray", "transfer_queue", "tensordict"}


def _modules():
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE_DIR)
                unit = rel.split(os.sep)[0].removesuffix(".py")
                yield path, rel, unit


def _imports(path):
    """(top-level package, m2po unit or None) of every import in the file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield parts[0], parts[1] if parts[0] == "m2po" and len(parts) > 1 else None
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            parts = node.module.split(".")
            if parts[0] == "m2po" and len(parts) == 1:  # from m2po import cpu_backend
                for alias in node.names:
                    yield "m2po", alias.name
            else:
                yield parts[0], parts[1] if parts[0] == "m2po" and len(parts) > 1 else None


def test_every_unit_has_a_layer():
    assert {unit for _, _, unit in _modules()} - {"__init__"} == set(LAYERS)


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for path, rel, unit in _modules():
        if unit == "__init__":
            continue
        for package, target in _imports(path):
            if package != "m2po" or target is None or target == unit or target == "__version__":
                continue
            if LAYERS[target] >= LAYERS[unit]:
                violations.append(f"{rel} (layer {LAYERS[unit]}) imports m2po.{target} (layer {LAYERS[target]})")
    assert violations == []


def test_the_bottom_layer_never_imports_verl():
    violations = [
        f"{rel} imports {package}"
        for path, rel, unit in _modules()
        if unit in VERL_FREE
        for package, _ in _imports(path)
        if package in VERL_PACKAGES
    ]
    assert violations == []


def test_the_walk_sees_lazy_imports(tmp_path):
    """The control: an import inside a function counts."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from m2po.testbed import rl\n")
    assert list(_imports(str(module))) == [("m2po", "testbed")]


@pytest.mark.parametrize("module", ["m2po.algorithm", "m2po.buffer", "m2po.utils.atomic_io", "m2po.utils.config_values"])
def test_bottom_layer_modules_import_without_verl(module):
    code = f"import sys, {module}; print(any(m == 'verl' or m.startswith('verl.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
