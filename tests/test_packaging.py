"""The distribution's shape: one import package, entry points, extras without surprises."""

import tomllib

from conftest import REPO
from setuptools import find_packages


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_only_qsm_robot_is_installed_as_a_package():
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=REPO, include=include)
    assert packages and all(p == "qsm_robot" or p.startswith("qsm_robot.") for p in packages)
    for site in ("sim", "deploy", "calib"):
        assert (REPO / site / "README.md").is_file()
        assert not (REPO / site / "__init__.py").exists()


def test_entry_points_and_extras():
    project = pyproject()["project"]
    assert project["scripts"]["qsm-train"] == "qsm_robot.cli.train:main"
    assert project["scripts"]["qsm-export"] == "qsm_robot.cli.export:main"
    extras = project["optional-dependencies"]
    assert {"train", "deploy", "gpu", "dev", "all"} <= set(extras)
    assert any(r.startswith("mujoco") and "<4" in r for r in extras["train"])
    for robot_side in ("deploy", "gpu"):
        assert not any(r.split(">")[0].split("=")[0] in ("torch", "mujoco", "dm-control") for r in extras[robot_side])
    assert not any("onnxruntime-gpu" in r for r in extras["all"] + extras["deploy"])  # never beside the CPU one
    assert any("onnxruntime" in r for r in extras["deploy"])
    constraints = (REPO / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints and "mujoco<4" in constraints
