"""The distribution as installed: its console scripts work, the robot-side extra is self-sufficient,
only ``qsm_robot`` is a package, and the package layers import in one direction."""

import ast
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

DIST = "qsm-robot"


def test_console_scripts_resolve_to_callables_and_are_installed():
    """Every script the project declares is installed, its executable exists beside this
    interpreter, and its entry point imports and is callable."""
    installed = {ep.name: ep for ep in md.distribution(DIST).entry_points if ep.group == "console_scripts"}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(declared) == set(installed), "installed metadata is stale: pip install -e . again"
    bin_dir = Path(sys.executable).parent
    for name, ep in installed.items():
        assert callable(ep.load()), name
        assert (bin_dir / name).is_file(), f"{name} is not installed in {bin_dir}"


def test_qsm_train_script_runs():
    """The installed qsm-train executable (not ``python -m``) starts and prints its help."""
    out = subprocess.run([str(Path(sys.executable).parent / "qsm-train"), "--help"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert "--q-grad-scale" in out.stdout


def _closure(requirements: list[Requirement], extras: set[str], seen: set[str]) -> set[str]:
    """Installed distributions that ``requirements`` (for ``extras``) pull in, transitively."""
    for req in requirements:
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            sub = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. onnxruntime-gpu): cannot be imported anyway
        seen.add(name)
        _closure([Requirement(r) for r in sub], set(req.extras), seen)
    return seen


def deploy_closure() -> set[str]:
    own = [Requirement(r) for r in md.distribution(DIST).requires or []]
    return _closure(own, {"deploy"}, set())


# What the robot computer runs: the serving node, calibration, the robot client, and the model readers.
DEPLOY_PACKAGES = ("qsm_robot.serve", "qsm_robot.calibrate")
DEPLOY_MODULES = ("qsm_robot.cli.serve", "qsm_robot.robot.client", "qsm_robot.export.contract",
                  "qsm_robot.export.runtime", "qsm_robot.files", "qsm_robot.policy_io")

_BLOCKED_IMPORT = """
import importlib, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not in the deploy extra", name=name)
        return None

sys.meta_path.insert(0, Block())
names = list(json.loads(sys.argv[3]))
for package in json.loads(sys.argv[2]):
    names += [m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")]
for name in names:
    importlib.import_module(name)
from qsm_robot.cli.serve import main
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(json.dumps(sorted(names)))
"""


def test_deploy_extra_modules_import_with_only_the_deploy_dependencies():
    """With every installed package outside the ``deploy`` extra's dependency closure made
    unimportable (torch, mujoco, dm_control, gymnasium, onnx, ...), every robot-side module
    imports and ``qsm-serve --help`` runs."""
    allowed = deploy_closure()
    assert {"numpy", "onnxruntime", "pyzmq"} <= allowed
    assert not {"torch", "mujoco", "dm-control", "gymnasium", "onnx"} & allowed
    blocked = sorted(
        module for module, dists in md.packages_distributions().items()
        if not module.startswith("_") and module != "qsm_robot"
        and not {canonicalize_name(d) for d in dists} & (allowed | {DIST})
    )
    assert {"torch", "mujoco", "dm_control", "gymnasium", "onnx"} <= set(blocked)
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, json.dumps(blocked), json.dumps(DEPLOY_PACKAGES),
                          json.dumps(DEPLOY_MODULES)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert "qsm_robot.serve.node" in imported and "qsm_robot.calibrate.record" in imported


def test_only_qsm_robot_is_installed_as_a_package():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=REPO, include=include)
    assert packages and all(p == "qsm_robot" or p.startswith("qsm_robot.") for p in packages)
    for site in ("sim", "deploy", "calib"):
        assert (REPO / site / "README.md").is_file()
        assert not (REPO / site / "__init__.py").exists()


def _imports(folder: Path) -> dict[str, set[str]]:
    """Module file -> every qsm_robot module it imports (at any depth: lazy imports count)."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[path.name] = {n for n in names if n.startswith("qsm_robot")}
    return found


def test_layers_import_in_one_direction():
    """qsm/ (the method) imports neither the run configuration nor training; export does not
    import training (it reads checkpoints through qsm/policy.py and checkpoint_layout.py)."""
    pkg = REPO / "qsm_robot"
    for name, imports in _imports(pkg / "qsm").items():
        bad = {m for m in imports if m == "qsm_robot.config" or m.startswith(("qsm_robot.train", "qsm_robot.export"))}
        assert not bad, f"qsm/{name} imports {sorted(bad)}"
    for name, imports in _imports(pkg / "export").items():
        bad = {m for m in imports if m.startswith(("qsm_robot.train", "qsm_robot.config", "qsm_robot.sweep"))}
        assert not bad, f"export/{name} imports {sorted(bad)}"
