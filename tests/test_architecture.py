"""Architecture rules of the repository, checked on the source text (AST) without importing it.

1. Layering: `spinverse_fem` follows the data path, and a module may import only its own layer
   or lower ones (LAYERS below; docs and pyproject.toml describe the layout). Every `import` and
   `from ... import` of a `spinverse_fem.*` module counts, wherever it sits (module level or
   inside a function: a lazy import is still a dependency). Relative imports are resolved, and
   `from spinverse_fem import X` counts as an import of `spinverse_fem.X` when X is a module.
2. No module in the repository edits `sys.path` (the package is installed; experiments/ is a
   package run with `python -m experiments.<script>` from the repository root; tests import
   `references` because tests/ has no __init__.py, so pytest puts tests/ on sys.path itself).
3. No `except ImportError` (or a broad except around an import) inside the package silences a
   missing import: an optional-dependency guard must re-raise with a clear message.
4. `forms` and `meshes` exist only as `spinverse_fem.forms` / `spinverse_fem.meshes` once
   installed, so nothing may import them under their folder names.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spinverse_fem"

# Layers, lowest first. The key is the first two components of a module name.
LAYERS = {
    "spinverse_fem": 0,             # the package root: __init__ holds only __version__
    "spinverse_fem.errors": 0,
    "spinverse_fem.parallel": 0,
    "spinverse_fem.config": 1,
    "spinverse_fem.io": 2,          # files: may import only layers 0-1
    "spinverse_fem.geometry": 3,
    "spinverse_fem.meshes": 3,      # top-level folder meshes/, installed under this name
    "spinverse_fem.fem": 4,
    "spinverse_fem.forms": 4,       # top-level folder forms/, installed under this name
    "spinverse_fem.forward": 5,
    "spinverse_fem.inverse": 6,
    "spinverse_fem.evaluation": 7,
    "spinverse_fem.cli": 8,
}

# Known layering violations being removed, as {(importing file, imported module)}; the test fails
# on any violation not listed here and on any entry that no longer occurs (so a fixed violation
# cannot come back unnoticed). Commit 6ed830a had four, all removed in the working tree since:
#   ("spinverse_fem/inverse/driver.py", "spinverse_fem.evaluation.compartments"),
#   ("spinverse_fem/inverse/driver.py", "spinverse_fem.evaluation.interface"),
#   ("spinverse_fem/inverse/driver.py", "spinverse_fem.evaluation.metrics"),
#   ("spinverse_fem/io/outputs.py", "spinverse_fem.evaluation.interface"),
# (inverse, 6, and io, 2, importing evaluation, 7). Keep this empty: fix a new violation instead.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# Folders that are never part of the checked source (virtual environment, build output, VCS).
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache"}


# -- where the package's modules live ------------------------------------------------------------

def _package_dirs() -> dict[str, Path]:
    """{package name: folder} of the installed packages, from pyproject.toml (package-dir maps
    forms/ and meshes/ into spinverse_fem; every other package sits at its dotted path)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = tool.get("package-dir", {})
    return {name: ROOT / mapped.get(name, name.replace(".", "/")) for name in tool["packages"]}


PACKAGE_DIRS = _package_dirs()


def _module_path(name: str) -> Path | None:
    """The file or package folder of module `name` in this checkout, or None if there is none."""
    for pkg in sorted(PACKAGE_DIRS, key=len, reverse=True):
        if name == pkg or name.startswith(pkg + "."):
            base = PACKAGE_DIRS[pkg].joinpath(*name[len(pkg):].split(".")[1:])
            if base.is_dir():
                return base
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            return None
    return None


def _module_name(path: Path) -> str:
    """Dotted module name of a package source file (meshes/paper.py: spinverse_fem.meshes.paper)."""
    for pkg, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: len(str(kv[1])), reverse=True):
        if path.parent == folder or folder in path.parents:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([pkg, *parts])
    raise ValueError(f"{path} is in no package of pyproject.toml")


def package_files() -> list[Path]:
    """Every .py file of the installed package (spinverse_fem/, forms/, meshes/)."""
    return sorted({p for folder in PACKAGE_DIRS.values() for p in folder.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)})


def repository_files() -> list[Path]:
    """Every .py file of the repository: package, tests, experiments, benchmarks, examples and the
    top-level scripts (virtual environments and build output excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# -- 1. layering ---------------------------------------------------------------------------------

def layer_of(module: str) -> int | None:
    """Layer of a spinverse_fem module (None for a sub-package missing from LAYERS)."""
    parts = module.split(".")
    return LAYERS.get(".".join(parts[:2])) if len(parts) > 1 else LAYERS.get(parts[0])


def imported_modules(tree: ast.Module, importer: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every spinverse_fem module imported anywhere in `tree`.

    importer: the dotted name of the importing module (for relative imports); is_package: it is
    an __init__.py. `from M import a` yields M.a when that is a module in this checkout, else M.
    """
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # the package a relative import starts from: level 1 = the importer's package
                base = importer.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if _module_path(sub) is not None else mod))
    return sorted((line, m) for line, m in out if m == PACKAGE or m.startswith(PACKAGE + "."))


def layering_violations() -> list[tuple[str, int, str, str]]:
    """(file, line, imported module, message) for every import that goes up a layer."""
    out = []
    for path in package_files():
        me = _module_name(path)
        mine = layer_of(me)
        for line, mod in imported_modules(_parse(path), me, path.name == "__init__.py"):
            theirs = layer_of(mod)
            if mine is None or theirs is None:
                unknown = me if mine is None else mod
                out.append((_rel(path), line, mod, f"{unknown} has no layer in LAYERS"))
            elif theirs > mine:
                out.append((_rel(path), line, mod, f"layer {theirs} above {mine}"))
    return out


def test_layering():
    found = layering_violations()
    new = [v for v in found if (v[0], v[2]) not in KNOWN_VIOLATIONS]
    gone = KNOWN_VIOLATIONS - {(v[0], v[2]) for v in found}
    lines = [f"{f}:{line} imports {mod} ({msg})" for f, line, mod, msg in new]
    lines += [f"{f} no longer imports {mod}: remove it from KNOWN_VIOLATIONS" for f, mod in
              sorted(gone)]
    assert not lines, "layering:\n" + "\n".join(lines)


def test_layering_check_catches_violations():
    """The checker itself: an upward import (absolute, relative, `from spinverse_fem import X`)
    is found; the same layer, a lower one and a non-module name of the root are not."""
    src = ("from spinverse_fem.inverse.driver import Inversion\n"
           "from ..evaluation import metrics\n"
           "from spinverse_fem import cli\n"
           "from spinverse_fem import __version__\n"
           "from . import reduced_model\n"
           "def f():\n"
           "    import spinverse_fem.config.reader\n")
    got = imported_modules(ast.parse(src), "spinverse_fem.forward.model", is_package=False)
    assert got == [(1, "spinverse_fem.inverse.driver"), (2, "spinverse_fem.evaluation.metrics"),
                   (3, "spinverse_fem.cli"), (4, "spinverse_fem"),
                   (5, "spinverse_fem.forward.reduced_model"), (7, "spinverse_fem.config.reader")]
    assert [layer_of(m) for _, m in got] == [6, 7, 8, 0, 5, 1]
    assert _module_name(ROOT / "meshes" / "paper.py") == "spinverse_fem.meshes.paper"
    assert _module_name(ROOT / "forms" / "__init__.py") == "spinverse_fem.forms"


def test_every_package_has_a_layer():
    missing = sorted(p for p in PACKAGE_DIRS if layer_of(p) is None)
    assert not missing, f"sub-packages without a layer in LAYERS: {missing}"


# -- 2. no sys.path edits ------------------------------------------------------------------------

_PATH_METHODS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__",
                 "__iadd__"}


def _is_sys_path(node) -> bool:
    """`sys.path`, or a subscript/slice of it."""
    if isinstance(node, ast.Subscript):
        node = node.value
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def sys_path_edits(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for every edit of the import path: sys.path methods, assignments, `del`,
    `from sys import path`, site.addsitedir and a PYTHONPATH set for a child process."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _PATH_METHODS and _is_sys_path(node.func.value):
                out.append((node.lineno, f"sys.path.{node.func.attr}()"))
            elif (node.func.attr == "addsitedir" and isinstance(node.func.value, ast.Name)
                  and node.func.value.id == "site"):
                out.append((node.lineno, "site.addsitedir()"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete))
                       else [node.target])
            if any(_is_sys_path(t) for t in targets):
                out.append((node.lineno, "sys.path assignment"))
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            if any(a.name == "path" for a in node.names):
                out.append((node.lineno, "from sys import path"))
        elif isinstance(node, ast.keyword) and node.arg == "PYTHONPATH":
            out.append((node.value.lineno, "PYTHONPATH for a child process"))
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value == "PYTHONPATH" for k in node.keys):
                out.append((node.lineno, "PYTHONPATH for a child process"))
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            if isinstance(node.slice, ast.Constant) and node.slice.value == "PYTHONPATH":
                out.append((node.lineno, "PYTHONPATH set"))
    return sorted(out)


def test_no_sys_path_edits():
    found = [f"{_rel(p)}:{line} {what}" for p in repository_files()
             for line, what in sys_path_edits(_parse(p))]
    assert not found, "sys.path edited (install the package / run as a module instead):\n" + \
        "\n".join(found)


def test_sys_path_check_catches_edits():
    src = ("import sys, site, os\n"
           "sys.path.insert(0, 'x')\n"
           "sys.path[:0] = ['x']\n"
           "sys.path = ['x']\n"
           "site.addsitedir('x')\n"
           "env = dict(os.environ, PYTHONPATH='x')\n"
           "print(sys.path)\n")
    assert [line for line, _ in sys_path_edits(ast.parse(src))] == [2, 3, 4, 5, 6]


def test_references_are_importable_without_path_edits():
    """tests/ has no __init__.py, so pytest (prepend import mode) puts tests/ on sys.path as the
    folder of conftest.py and the test modules: `references` comes from tests/references."""
    import importlib.util

    assert not (ROOT / "tests" / "__init__.py").exists()
    spec = importlib.util.find_spec("references")
    assert spec is not None and Path(spec.origin) == ROOT / "tests" / "references" / "__init__.py"


# -- 3. no silenced imports in the package -------------------------------------------------------

_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}
_BROAD = {"Exception", "BaseException"}


def _names(node) -> set[str]:
    if node is None:
        return {"<bare>"}
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def silenced_imports(tree: ast.Module) -> list[int]:
    """Lines of `except` handlers that catch an import failure and do not raise: handlers of
    ImportError / ModuleNotFoundError, and bare or broad handlers around an import."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        imports = any(isinstance(n, (ast.Import, ast.ImportFrom))
                      for stmt in node.body for n in ast.walk(stmt))
        for h in node.handlers:
            caught = _names(h.type)
            if not (caught & _IMPORT_ERRORS or (imports and caught & (_BROAD | {"<bare>"}))):
                continue
            if not any(isinstance(n, ast.Raise) for stmt in h.body for n in ast.walk(stmt)):
                out.append(h.lineno)
    return out


def test_no_silenced_imports_in_the_package():
    found = [f"{_rel(p)}:{line}" for p in package_files() for line in silenced_imports(_parse(p))]
    assert not found, "import failures silenced (re-raise with a clear message):\n" + \
        "\n".join(found)


def test_silenced_import_check():
    src = ("try:\n    import h5py\nexcept ImportError:\n    h5py = None\n"
           "try:\n    import meshio\nexcept ImportError as e:\n"
           "    raise ImportError('pip install meshio') from e\n"
           "try:\n    import foo\nexcept Exception:\n    pass\n"
           "try:\n    x = int('a')\nexcept ValueError:\n    pass\n")
    assert silenced_imports(ast.parse(src)) == [3, 11]


# -- 4. forms and meshes only inside spinverse_fem -----------------------------------------------

def test_no_top_level_forms_or_meshes_imports():
    """From the repository root (`python -m pytest` puts it on sys.path) `import meshes` would
    work, and then fail once installed: only the spinverse_fem.* names are allowed."""
    found = []
    for path in repository_files():
        for node in ast.walk(_parse(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{_rel(path)}:{node.lineno} imports {n}" for n in names
                      if n and n.split(".")[0] in ("forms", "meshes")]
    assert not found, "\n".join(found)


@pytest.mark.serial_only
def test_forms_and_meshes_not_top_level_when_installed(tmp_path):
    """Outside the checkout (cwd = a temporary folder, no PYTHONPATH) the installed environment
    has spinverse_fem.forms and spinverse_fem.meshes but no top-level forms or meshes."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    code = ("import importlib.util as u\n"
            "print(u.find_spec('forms'), u.find_spec('meshes'))\n"
            "print(u.find_spec('spinverse_fem.forms') is not None, "
            "u.find_spec('spinverse_fem.meshes') is not None)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["None None", "True True"], r.stdout
