"""The kit's shape: flat modules whose imports point one way, no private name used across modules,
a config that loads without torch, and pyfunc code that carries every module it imports."""

import ast
import os
import subprocess
import sys

import pytest

import wmtp_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def kit_imports(module: str) -> list[tuple[str, list[str], bool]]:
    """(kit module imported, names taken from it, at module level?) for each import in `module`."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in KIT:
            out.append((node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names if a.name in KIT]
    return out


def test_no_private_name_is_used_outside_its_module():
    used = []
    for module in KIT:
        src = open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read()
        for other, names, _ in kit_imports(module):
            used += [f"{module}: from {other} import {n}" for n in names if n.startswith("_")]
        for node in ast.walk(ast.parse(src)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in KIT
                and node.value.id != module
                and node.attr.startswith("_")
            ):
                used.append(f"{module}: {node.value.id}.{node.attr}")
    assert used == []


def test_module_level_imports_have_no_cycle():
    graph = {m: {o for o, _, top in kit_imports(m) if top and o != m} for m in KIT}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, f"import cycle: {' -> '.join([*path, m])}"
        if m in done:
            return
        for o in graph[m]:
            visit(o, [*path, m])
        done.add(m)

    for m in KIT:
        visit(m, [])


@pytest.mark.parametrize(
    "code",
    [
        "import wmtp; wmtp.load_config(None)",
        "sys.argv = ['migrate.py', '--help']; runpy.run_path('migrate.py', run_name='__main__')",
    ],
)
def test_a_config_and_migrate_help_import_neither_torch_nor_transformers(code):
    probe = (
        "import contextlib, io, runpy, sys\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    {code}\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_the_facade_still_gives_a_notebook_everything():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from wmtp import mtp_loss, load_model, iter_dataset, check_program, greedy_decode; "
            "import wmtp; print(sorted(set(wmtp.__all__) - set(dir(wmtp))))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_pyfunc_code_is_every_kit_module_it_imports():
    code = wmtp_runs.kit_modules("wmtp_pyfunc.py")
    assert {
        "wmtp_decode.py",
        "wmtp_eval.py",
        "wmtp_model.py",
        "wmtp_loss.py",
        "io_stream.py",
    } <= set(code)
    # closed: every kit module those files import is among them
    for file in code:
        for other, _, _ in kit_imports(file[:-3]):
            assert f"{other}.py" in code


def test_every_top_level_module_is_installed():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == KIT
