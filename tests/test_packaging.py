"""What `pip install` puts in site-packages: the wheel and the sdist built from a copy of this
checkout, offline (setuptools from this venv, no build isolation), hold the kit's own names only."""

import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)
MODULES = PYPROJECT["tool"]["setuptools"]["py-modules"]
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]
DIST = f"{PYPROJECT['project']['name'].replace('-', '_')}-{PYPROJECT['project']['version']}"
MBPP_JSON = sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "wmtp_mbpp", "*.json"))
)
# top-level names the kit owns besides wmtp*: a new generic one (data, utils, tests) would shadow
# or be shadowed by another distribution's in site-packages, so it has to be added here on purpose
OTHER_OWNED = {"io_stream", "train_critic", "train_mtp", "eval_mtp", "compare_mtp", "migrate"}
# what a checkout holds that is no source: left out of the copy the builds run in
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "*.egg-info", "__pycache__", "runs", "mlruns", "mlflow.db",
    ".pytest_cache", ".ruff_cache", ".whl", "_work",
)  # fmt: skip
HOOK = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_{}(sys.argv[1]))"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, sdist path, build output): one build each, as a frontend calls the hooks."""
    pytest.importorskip("setuptools")  # torch requires it, so every venv of the kit has it
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)  # builds write build/ and *.egg-info beside it
    logs = []
    for hook in ("sdist", "wheel"):  # one process per hook: setuptools keeps state between them
        r = subprocess.run(
            [sys.executable, "-c", HOOK.format(hook), str(out)],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        logs.append(r.stdout + r.stderr)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist, "\n".join(logs)


def test_the_wheel_holds_the_listed_modules_the_package_and_its_metadata_only(built):
    with zipfile.ZipFile(built[0]) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {f"{m}.py" for m in MODULES} | set(PACKAGES) | {f"{DIST}.dist-info"}
    owned = {m for m in MODULES + PACKAGES if m.startswith("wmtp") or m in OTHER_OWNED}
    assert owned == set(MODULES + PACKAGES)
    assert MBPP_JSON and {f"wmtp_mbpp/{j}" for j in MBPP_JSON} <= set(names)


def test_the_sdist_holds_the_modules_and_mbpp(built):
    with tarfile.open(built[1]) as t:
        names = {n.removeprefix(f"{DIST}/") for n in t.getnames()}
    expected = {f"{m}.py" for m in MODULES} | {f"wmtp_mbpp/{j}" for j in MBPP_JSON}
    assert expected | {"pyproject.toml", "wmtp_mbpp/__init__.py"} <= names


def test_the_builds_warn_of_nothing(built):
    """No SetuptoolsDeprecationWarning, "Package would be ignored", "warning: no files found"..."""
    said = [
        line
        for line in built[2].splitlines()
        if re.search(r"warn|would be ignored|deprecat", line, re.I)
        and not re.match(r"\s*(copying|adding|creating) ", line)
        and "byte-compiling is disabled" not in line  # PYTHONDONTWRITEBYTECODE, not the project
    ]
    assert said == []
