"""Packaging checks: the wheel carries the package and its embedded data, and the
runtime requirements stay lower bounds (the CPU pin lives in constraints/cpu.txt, for
the README/CI path only).

The wheel is built from a copy of the sources (pyproject.toml, README.md, rotvq/) in a
temporary folder, so the test neither writes into the checkout nor picks up stale
files from an old ``build/`` folder.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


try:
    import tomllib  # Python >= 3.11
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib


@pytest.fixture(scope="module")
def pyproject(repo_root) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))


def requirement(pyproject: dict, name: str) -> Requirement:
    found = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    matches = [r for r in found if r.name == name]
    assert len(matches) == 1, f"expected one {name!r} requirement, found {found}"
    return matches[0]


@pytest.mark.parametrize("name, minimum", [("torch", "2.1"), ("numpy", "1.24"), ("tqdm", "4.60")])
def test_runtime_requirement_is_a_lower_bound(pyproject, name, minimum):
    req = requirement(pyproject, name)
    operators = {spec.operator for spec in req.specifier}
    assert operators == {">="}, f"{name} must be a lower bound only, got {req}"
    (spec,) = req.specifier
    assert Version(spec.version) == Version(minimum), req
    # A newer release satisfies it: the requirement is not an exact pin in disguise.
    assert req.specifier.contains("99.0")


def test_runtime_dependencies_are_only_torch_numpy_and_tqdm(pyproject):
    names = sorted(Requirement(r).name for r in pyproject["project"]["dependencies"])
    assert names == ["numpy", "torch", "tqdm"]


def test_cpu_constraint_pins_torch_for_ci_only(repo_root, pyproject):
    lines = [
        line.split("#")[0].strip()
        for line in (repo_root / "constraints" / "cpu.txt").read_text(encoding="utf-8").splitlines()
    ]
    pins = [Requirement(line) for line in lines if line]
    torch_pins = [r for r in pins if r.name == "torch"]
    assert len(torch_pins) == 1 and str(torch_pins[0].specifier).startswith("=="), pins
    # The pin must satisfy the package's own requirement.
    assert requirement(pyproject, "torch").specifier.contains(
        next(iter(torch_pins[0].specifier)).version
    )


def _can_build_without_isolation() -> bool:
    """True if this environment has a setuptools able to build a wheel by itself."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    if Version(setuptools.__version__) >= Version("70.1"):  # bdist_wheel built in
        return True
    return Version(setuptools.__version__) >= Version("64") and (
        importlib.util.find_spec("wheel") is not None
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, repo_root) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(repo_root / "pyproject.toml", src / "pyproject.toml")
    shutil.copy2(repo_root / "README.md", src / "README.md")
    shutil.copytree(
        repo_root / "rotvq", src / "rotvq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if _can_build_without_isolation():
        command.insert(4, "--no-build-isolation")  # no network needed
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("rotvq-0.1.0-*.whl"))
    assert len(wheels) == 1, f"expected one rotvq wheel, found {list(out.iterdir())}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.mark.slow
def test_wheel_contains_package_modules(repo_root, wheel_names):
    assert "rotvq/__init__.py" in wheel_names
    sources = {
        p.relative_to(repo_root).as_posix()
        for p in (repo_root / "rotvq").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(sources - wheel_names)
    assert not missing, f"modules missing from the wheel: {missing}"


@pytest.mark.slow
def test_wheel_contains_embedded_data(repo_root, wheel_names):
    data = {p.relative_to(repo_root).as_posix() for p in (repo_root / "rotvq").rglob("_data/*.npz")}
    assert data, "no embedded datasets found under rotvq/"
    missing = sorted(data - wheel_names)
    assert not missing, f"embedded datasets missing from the wheel: {missing}"


@pytest.mark.slow
def test_wheel_ships_only_the_package(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names}
    extra = sorted(t for t in top_level if t != "rotvq" and not t.endswith(".dist-info"))
    assert not extra, f"the wheel ships more than the rotvq package: {extra}"


@pytest.mark.slow
def test_wheel_metadata(wheel, wheel_names):
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
        assert "rotvq-experiment = rotvq.lab.experiment:main" in zf.read(entry_points).decode()
        assert "rotvq-study = rotvq.lab.study:main" in zf.read(entry_points).decode()
        (metadata,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("Requires-Dist:")]
    runtime = sorted(r for r in requires if "extra ==" not in r)
    assert runtime == ["numpy>=1.24", "torch>=2.1", "tqdm>=4.60"], runtime
    assert "Requires-Python: >=3.10" in text
