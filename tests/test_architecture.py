"""The packages under ask/ import downwards only (docs/ARCHITECTURE.md draws the layers).

Every module is parsed, not imported, and every ``ask.*`` import in it is checked, imports inside
functions included (the console scripts import torch-heavy code lazily, and a lazy import is still
a dependency). Imports built from strings (``importlib.import_module``) are not seen. A
package may import itself and the packages of lower layers; packages of one layer are peers and
import neither each other nor anything above. No two packages import each other, however
indirectly, and no module takes a ``_private`` name (a module or a member) from another package;
nor does any test or script.

The names of a run directory's files (``metrics.json``, ``last.pt``, ...) are spelled only in
``RUN_FILES_MODULE``: a string in ``ask/`` or ``scripts/`` that is such a name, or a path ending in
one, is refused anywhere else (tests keep their literals: they check the on-disk contract).

Attributes are checked too, by name, for the packages in ``SEALED``: no code outside such a package
(other packages, tests, scripts) reads, sets or monkeypatches an attribute whose name is one of
the package's private names (``obj._indexes``, ``setattr(obj, "_fit", ...)``). Without types
this cannot tell whose ``_name`` it is, so a name is refused wherever it is spelled; a sealed
package's private names are distinctive enough that nothing else uses them today.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

#: The layers, top first. ``ask`` is the root package itself (``ask.wrap``, a facade for users).
LAYERS: list[tuple[str, ...]] = [
    ("cli", "ask"),
    ("evaluation", "training", "reporting"),
    ("wiring",),
    ("defenses",),
    ("attacks",),
    ("knn", "data"),
    ("models",),
    ("utils",),
    ("config",),
    ("errors", "constants"),
]
ROOT_PACKAGE = "ask"
#: Packages whose private attributes no outside code touches (see the module docstring).
SEALED: tuple[str, ...] = ("knn",)
#: The one module that names the files of a run directory (see the module docstring).
RUN_FILES_MODULE = "ask/utils/runfiles.py"


@dataclass(frozen=True)
class Import:
    """One ``ask.*`` import: where it stands and what it names."""

    file: str  # relative to the folder holding ask/
    line: int
    importer: str  # the importing module's package (cli, knn, ..., or ask for the root package)
    target: str  # the imported module's package
    statement: str  # as written, e.g. "from ask.training.trainer import train"
    private: tuple[str, ...]  # the _private modules or members it names


def package_of(module: str) -> str:
    """``ask.knn.store`` -> ``knn``; ``ask.wiring`` -> ``wiring``; ``ask`` -> ``ask`` (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_PACKAGE


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def collect_imports(source_root: Path, folder: str = "ask") -> list[Import]:
    """Every import of an ``ask`` module by a module under ``source_root / folder``."""
    found = []
    for path in sorted((source_root / folder).rglob("*.py")):
        parts = path.relative_to(source_root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, [], ast.unparse(node)) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [alias.name for alias in node.names]
                if base == ROOT_PACKAGE:  # `from ask import wiring` names a package, not the root
                    targets = [(f"{base}.{name}", [], ast.unparse(node)) for name in names]
                else:
                    targets = [(base, names, ast.unparse(node))]
            else:
                continue
            for target, names, statement in targets:
                if target != ROOT_PACKAGE and not target.startswith(ROOT_PACKAGE + "."):
                    continue
                private = tuple(p for p in target.split(".")[1:] if _is_private(p)) + tuple(
                    n for n in names if _is_private(n))
                importer = package_of(module) if folder == "ask" else folder
                found.append(Import(str(path.relative_to(source_root)), node.lineno, importer,
                                    package_of(target), statement, private))
    return found


def layer_violations(imports: list[Import], layers: list[tuple[str, ...]]) -> list[str]:
    rank = {package: index for index, layer in enumerate(layers) for package in layer}
    problems = []
    for imp in imports:
        if imp.target == imp.importer or imp.target not in rank or imp.importer not in rank:
            continue
        if rank[imp.target] <= rank[imp.importer]:
            where = "its peer" if rank[imp.target] == rank[imp.importer] else "a higher layer"
            allowed = [p for layer in layers[rank[imp.importer] + 1:] for p in layer]
            problems.append(f"{imp.file}:{imp.line} `{imp.statement}`: {imp.importer} imports {where} "
                            f"{imp.target}; {imp.importer} may import only {', '.join(allowed) or 'itself'}")
    return problems


def package_cycles(imports: list[Import]) -> list[str]:
    """Each cycle between packages once, as ``a -> b -> a`` with the import behind every arrow."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    cycles, seen = [], set()

    def visit(package: str, path: list[str]) -> None:
        for target in sorted(edges.get(package, {})):
            if target in path:
                cycle = path[path.index(target):] + [target]
                key = frozenset(zip(cycle, cycle[1:], strict=False))
                if key not in seen:
                    seen.add(key)
                    steps = [edges[a][b] for a, b in zip(cycle, cycle[1:], strict=False)]
                    cycles.append(" -> ".join(cycle) + " (" + "; ".join(
                        f"{s.file}:{s.line} `{s.statement}`" for s in steps) + ")")
            elif len(path) < 30:
                visit(target, [*path, target])

    for start in sorted(edges):
        visit(start, [start])
    return cycles


def private_crossings(imports: list[Import]) -> list[str]:
    return [f"{imp.file}:{imp.line} `{imp.statement}`: {imp.importer} takes {', '.join(imp.private)} "
            f"from {imp.target}, private to that package; make it public there or keep it inside"
            for imp in imports if imp.private and imp.target != imp.importer]


def private_names(package_dir: Path) -> set[str]:
    """The ``_private`` names a package defines: functions, classes, module names, attributes it sets."""
    names = set()
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if _is_private(name) and name != "_"}


def private_attribute_uses(source_root: Path, package: str, folders: tuple[str, ...]) -> list[str]:
    """Where code under ``folders`` (outside ``ask/<package>``) names a private attribute of ``package``:
    ``x._name`` with ``x`` not ``self`` / ``cls``, or ``"_name"`` / ``"a.b._name"`` as a string."""
    sealed = source_root / "ask" / package
    names = private_names(sealed)
    problems = []
    for folder in folders:
        for path in sorted((source_root / folder).rglob("*.py")):
            if path.is_relative_to(sealed):
                continue
            nodes = sorted(ast.walk(ast.parse(path.read_text(), filename=str(path))),
                           key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
            for node in nodes:
                if isinstance(node, ast.Attribute) and node.attr in names:
                    if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                        continue
                    used = ast.unparse(node)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and node.value.rsplit(".", 1)[-1] in names:
                    used = repr(node.value)
                else:
                    continue
                problems.append(f"{path.relative_to(source_root)}:{node.lineno} `{used}` is private to "
                                f"ask.{package}; use or add a public accessor there")
    return problems


def run_file_names(module: Path) -> dict[str, str]:
    """``{"metrics.json": "METRICS_FILE", ...}``: the module's top-level string constants."""
    names = {}
    for node in ast.parse(module.read_text(), filename=str(module)).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    names[node.value.value] = target.id
    return names


def run_file_literals(source_root: Path, folders: tuple[str, ...]) -> list[str]:
    """Where code under ``folders`` spells a run file's name itself, alone or at the end of a path
    (``"metrics.json"``, ``f"{d}/metrics.json"``), instead of taking it from ``RUN_FILES_MODULE``."""
    source = source_root / RUN_FILES_MODULE
    names = run_file_names(source)
    problems = []
    for folder in folders:
        for path in sorted((source_root / folder).rglob("*.py")):
            if path == source:
                continue
            strings = sorted((node for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
                              if isinstance(node, ast.Constant) and isinstance(node.value, str)),
                             key=lambda node: (node.lineno, node.col_offset))
            for node in strings:
                name = node.value.rsplit("/", 1)[-1]
                if name in names:
                    problems.append(f"{path.relative_to(source_root)}:{node.lineno} `{node.value!r}` spells a run "
                                    f"file's name; use {names[name]} from {RUN_FILES_MODULE}")
    return problems


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports(REPO)


def test_every_package_has_a_layer() -> None:
    on_disk = {path.name for path in (REPO / "ask").iterdir() if (path / "__init__.py").is_file()}
    on_disk |= {path.stem for path in (REPO / "ask").glob("*.py") if path.stem != "__init__"}
    on_disk.discard("conf")  # config files, no code
    placed = {package for layer in LAYERS for package in layer} - {ROOT_PACKAGE}
    assert on_disk == placed, f"place each package in LAYERS: unplaced {sorted(on_disk - placed)}, " \
                              f"gone {sorted(placed - on_disk)}"


def test_packages_import_only_their_own_or_lower_layers(imports: list[Import]) -> None:
    assert len(imports) > 100  # the parse found the imports (today about 210)
    problems = layer_violations(imports, LAYERS)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_cycle_between_packages(imports: list[Import]) -> None:
    cycles = package_cycles(imports)
    assert not cycles, "packages that import each other:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_package(imports: list[Import]) -> None:
    problems = private_crossings(imports)
    assert not problems, "private names imported from another package:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", ["tests", "scripts"])
def test_tests_and_scripts_use_only_public_names_of_the_package(folder: str) -> None:
    imports = collect_imports(REPO, folder)
    assert len(imports) > 10  # the parse found them
    problems = private_crossings(imports)
    assert not problems, f"private names of ask imported by {folder}/:\n" + "\n".join(problems)


@pytest.mark.parametrize("package", SEALED)
def test_no_private_attribute_of_a_sealed_package_is_used_outside_it(package: str) -> None:
    assert len(private_names(REPO / "ask" / package)) > 10  # the parse found them
    problems = private_attribute_uses(REPO, package, ("ask", "tests", "scripts"))
    assert not problems, "private attributes used from outside:\n" + "\n".join(problems)


def test_run_file_names_are_spelled_in_one_module_only() -> None:
    assert len(run_file_names(REPO / RUN_FILES_MODULE)) > 10  # the parse found them
    problems = run_file_literals(REPO, ("ask", "scripts"))
    assert not problems, "run file names spelled outside their module:\n" + "\n".join(problems)


def test_the_run_file_check_catches_names_and_paths_but_not_prose(tmp_path: Path) -> None:
    files = {
        RUN_FILES_MODULE: 'METRICS_FILE = "metrics.json"\nLOCK_FILE = ".lock"\nlocal = "best.pt"\n',
        "ask/cli/job.py": 'from ask.utils.runfiles import METRICS_FILE\n\n'
                          'def run(d):\n    (d / METRICS_FILE).touch()\n    (d / ".lock").touch()\n'
                          '    print(f"wrote {d / \'metrics.json\'}")\n    return "no metrics.json here"\n',
        "scripts/summary.py": 'def read(d):\n    return open(f"{d}/metrics.json"), d.glob("**/.lock"), "best.pt"\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert run_file_names(tmp_path / RUN_FILES_MODULE) == {"metrics.json": "METRICS_FILE", ".lock": "LOCK_FILE"}
    assert [line.split(" spells ")[0] for line in run_file_literals(tmp_path, ("ask", "scripts"))] == [
        "ask/cli/job.py:5 `'.lock'`", "ask/cli/job.py:6 `'metrics.json'`",
        "scripts/summary.py:2 `'/metrics.json'`", "scripts/summary.py:2 `'**/.lock'`"]


def test_the_attribute_check_catches_reads_writes_and_monkeypatches(tmp_path: Path) -> None:
    files = {
        "ask/low/store.py": "_LIMIT = 3\n\nclass Store:\n    def __init__(self):\n        self._rows = []\n\n"
                            "    def _scan(self):\n        return self._rows\n",
        "tests/test_low.py": "def test(store, monkeypatch):\n    store._rows.append(1)\n    self._scan = None\n"
                             "    monkeypatch.setattr(store, '_scan', None)\n"
                             "    monkeypatch.setattr('ask.low.store._LIMIT', 1)\n    store.rows = store._other\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert private_names(tmp_path / "ask" / "low") == {"_LIMIT", "_rows", "_scan"}
    assert [line.split(" is ")[0] for line in private_attribute_uses(tmp_path, "low", ("ask", "tests"))] == [
        "tests/test_low.py:2 `store._rows`", "tests/test_low.py:4 `'_scan'`",
        "tests/test_low.py:5 `'ask.low.store._LIMIT'`"]


def test_the_checks_catch_lazy_relative_and_private_imports(tmp_path: Path) -> None:
    """The checker itself, on a small tree with one of each mistake."""
    files = {
        "ask/__init__.py": "",
        "ask/errors.py": "",
        "ask/low/__init__.py": "from .inner import helper\n",
        "ask/low/inner.py": "def helper():\n    from ask.high.job import run  # lazy, still upward\n",
        "ask/high/__init__.py": "",
        "ask/high/job.py": "from ask.low.inner import _secret\nimport ask.errors\n\ndef run():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = collect_imports(tmp_path)
    layers = [("high",), ("low",), ("errors",)]

    assert layer_violations(found, layers) == [
        "ask/low/inner.py:2 `from ask.high.job import run`: low imports a higher layer high; "
        "low may import only errors"]
    (cycle,) = package_cycles(found)
    assert cycle.startswith("high -> low -> high (ask/high/job.py:1 `from ask.low.inner import _secret`; "
                            "ask/low/inner.py:2")
    (private,) = private_crossings(found)
    assert private.startswith("ask/high/job.py:1 `from ask.low.inner import _secret`: high takes _secret from low")
    # The relative import resolved to the package's own module: neither upward nor private.
    assert any(imp.statement == "from .inner import helper" and imp.target == "low" for imp in found)
