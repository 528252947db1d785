"""The package's layers hold: each layer imports only those below it, there is no import
cycle, the maths reads no config or file, and ``import metarep`` is light and side-effect free.

The import graph is read from the source (every ``import`` statement, function-level ones
included), so a deferred import cannot hide a cycle or a layer violation.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "metarep"

LAYERS = ["errors", "core", "engine", "run", "sweeps", "study", "cli"]
"""Bottom to top; a module may import modules of its own layer and of the layers below."""

ALLOWED_BELOW = {
    "errors": set(),
    "core": {"errors"},
    "engine": {"errors", "core"},
    "run": {"errors", "core", "engine"},
    "sweeps": {"errors", "core", "engine", "run"},
    "study": {"errors", "core", "engine", "run", "sweeps"},
    "cli": {"errors", "core", "engine", "run", "sweeps", "study"},
}
CORE_FORBIDDEN = ("torch", "pandas", "matplotlib", "yaml", "ray", "scipy.stats", "pathlib",
                  "tqdm", "typer")
"""What the maths may not import: no torch, no tables, no plotting, no config, no files."""


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a`` and, when
    ``a.b`` is a module of the package, ``a.b``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if candidate in MODULES:
                    found.add(candidate)
    return found


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name}
         for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package itself (metarep)
    return "cli" if parts[1] == "__main__" else parts[1]  # python -m metarep is the command


def test_every_module_belongs_to_a_layer():
    stray = [m for m in MODULES if m != "metarep" and layer_of(m) not in LAYERS]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "metarep"))
def test_a_module_imports_only_its_layer_and_those_below(module):
    layer = layer_of(module)
    allowed = ALLOWED_BELOW[layer] | {layer}
    for imported in GRAPH[module]:
        target = layer_of(imported)
        assert target is None or target in allowed, f"{module} ({layer}) imports {imported}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> imported modules) as a path, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from a import x\n")
    graph = {"a": imports_of(tmp_path / "a.py"), "b": imports_of(tmp_path / "b.py")}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_package_imports_nothing_of_its_own_at_import_time():
    """``metarep/__init__.py`` resolves its names lazily: it imports no submodule."""
    assert GRAPH["metarep"] == set()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "core"))
def test_the_maths_imports_no_config_files_plotting_or_torch(module):
    for imported in imports_of(MODULES[module]):
        assert not any(imported == f or imported.startswith(f + ".") for f in CORE_FORBIDDEN), (
            f"{module} imports {imported}")


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)


def test_import_metarep_is_light_and_leaves_matplotlib_alone():
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "before = set(sys.modules)\n"
        "import metarep\n"
        "heavy = [m for m in ('matplotlib.pyplot', 'pandas', 'torch', 'ray', 'scipy.stats')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert [m for m in set(sys.modules) - before if m.startswith('metarep.')] == []\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "metarep.FOANIL, metarep.run_sweep\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "print('ok')\n")
    result = _fresh(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_fo_anil_update_loads_no_config_and_no_file_reader():
    code = (
        "import sys\n"
        "from metarep.core.methods.fo_anil import FOANIL\n"
        "loaded = [m for m in sys.modules if m.startswith('metarep.')\n"
        "          and not m.startswith(('metarep.core', 'metarep.errors'))]\n"
        "assert not loaded, loaded\n"
        "assert not [m for m in ('yaml', 'pandas', 'matplotlib', 'torch') if m in sys.modules]\n"
        "print('ok')\n")
    result = _fresh(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_lazy_names_resolve_to_their_modules():
    import metarep

    for name in metarep.__all__:
        assert getattr(metarep, name) is not None, name
    with pytest.raises(AttributeError):
        metarep.no_such_name  # noqa: B018


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if layer_of(m) in ("core", "engine")))
def test_the_maths_speaks_of_its_arguments_not_of_config_keys(module):
    """Errors at the right depth: core and engine raise ArgumentError naming their own
    arguments; only the run layer turns them into ConfigError with a config key."""
    source = MODULES[module].read_text()
    assert "ConfigError" not in source, module
