"""The documentation site stays complete and true to the code.

The fast tests need no MkDocs: the generated parts (config keys, CLI options, README's results)
come from the hooks in ``docs/hooks.py``, every page of the nav exists, every public module
has its ``::: module`` block in the API pages and every command its options table. The slow
test builds the site with ``mkdocs build --strict`` when the ``docs`` extra is installed.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from metarep.run.schema import key_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCE = ROOT / "src" / "metarep"
API_BLOCK = re.compile(r"^::: *(?P<module>[\w.]+) *$", re.MULTILINE)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load("metarep_docs_hooks", DOCS / "hooks.py")


def _mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _nav_pages(nav: object) -> list[str]:
    """Every page path of a MkDocs nav (strings, lists and one-key mappings, nested)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {nav!r}")


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_hook_is_declared_in_mkdocs_yml():
    assert "docs/hooks.py" in _mkdocs_config()["hooks"]


def test_key_page_is_generated_from_the_schema():
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert page.count(hooks.KEYS_MARKER) == 1, "docs/cli.md must hold the config-keys marker"
    assert hooks.fill_markers(hooks.KEYS_MARKER) == key_table()
    filled = hooks.fill_markers(page)
    assert key_table() in filled and hooks.KEYS_MARKER not in filled
    on_event = hooks.on_page_markdown(page, page=None, config=None, files=None)
    assert on_event == filled


def test_every_command_has_its_generated_options_table():
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    marked = [match["command"] for match in hooks.CLI_MARKER.finditer(page)]
    commands = list(hooks.cli_commands())
    assert sorted(marked) == sorted(commands), "one <!-- cli-options: NAME --> per command"
    for command in commands:
        assert f"## `metarep {command}`" in page, f"docs/cli.md needs a section for {command}"
        table = hooks.cli_table(command)
        for param in hooks.cli_commands()[command].params:
            if param.param_type_name == "option":
                assert f"`{param.opts[0]}`" in table
    filled = hooks.fill_markers(page)
    assert not hooks.CLI_MARKER.search(filled)
    assert "| `--scale` |" in hooks.cli_table("reproduce")
    with pytest.raises(ValueError, match="no command"):
        hooks.cli_table("no-such-command")


def test_results_block_comes_from_readme_with_working_image_paths():
    block = hooks.readme_results(_readme())
    assert block and "docs/results/" not in block
    images = re.findall(r"!\[[^\]]*\]\((results/[^)]+)\)", block)
    assert images, "README's results block shows the figures"
    for image in images:
        assert (DOCS / image).is_file(), image
    page = (DOCS / "study.md").read_text(encoding="utf-8")
    assert hooks.RESULTS_MARKER in page
    assert block in hooks.fill_markers(page, _readme())
    with pytest.raises(ValueError, match="results block"):
        hooks.readme_results("no markers here")


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    pages = _nav_pages(_mkdocs_config()["nav"])
    assert len(pages) == len(set(pages)), "a page listed twice in the nav"
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav lists {page}, which does not exist"
    written = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert written == set(pages), "every page under docs/ must be in mkdocs.yml's nav"


def _public_modules() -> set[str]:
    modules = {"metarep"}
    for info in pkgutil.walk_packages([str(SOURCE)], prefix="metarep."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            modules.add(info.name)
    return modules


def _api_blocks() -> list[str]:
    return [match["module"] for path in sorted((DOCS / "api").glob("*.md"))
            for match in API_BLOCK.finditer(path.read_text(encoding="utf-8"))]


def test_every_public_module_is_in_the_api_reference():
    public = _public_modules()
    blocks = _api_blocks()
    assert {"metarep.core.problem", "metarep.engine.learner", "metarep.study.claims"} <= public
    missing = sorted(public - set(blocks))
    assert not missing, f"add a '::: module' block to docs/api/*.md for {missing}"
    stale = sorted(set(blocks) - public)
    assert not stale, f"docs/api/*.md documents modules that do not exist: {stale}"
    assert len(blocks) == len(set(blocks)), "a module documented twice"


def test_getting_started_shows_readmes_set_up_commands():
    readme = _readme()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", section, re.DOTALL)
    assert len(commands) == 2, "README's set-up section has its two commands"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for command in commands:
        assert f"```bash\n{command}\n```" in index, "docs/index.md must show README's command"
    assert "```bash\nmetarep reproduce\n```" in index


def test_sphinx_roles_become_markdown_references():
    pytest.importorskip("griffe", reason='the docs extra is not installed: pip install -e .[docs]')
    roles = _load("metarep_docs_griffe_roles", DOCS / "griffe_roles.py")
    known = {"metarep.errors.ConfigError": "metarep.errors.ConfigError",
             "run_sweep": "metarep.sweeps.driver.run_sweep"}
    text = ("Raises :class:`~metarep.errors.ConfigError`; see :func:`run_sweep` and "
            ":func:`_private`, :mod:`the maths <metarep.core>`, ``code`` stays.")
    converted = roles.convert_roles(text, lambda role, target: known.get(target))
    assert converted == (
        "Raises [`ConfigError`][metarep.errors.ConfigError]; see "
        "[`run_sweep`][metarep.sweeps.driver.run_sweep] and `_private`, `the maths`, "
        "``code`` stays.")


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    needed = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    absent = [name for name in needed if importlib.util.find_spec(name.split(".")[0]) is None]
    if absent:
        pytest.skip(f'the docs extra is not installed ({", ".join(absent)}): '
                    'pip install -e ".[docs]"')
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (site / "index.html").is_file()
    keys = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "problem.noise_var" in keys and hooks.KEYS_MARKER not in keys
    core = (site / "api" / "core" / "index.html").read_text(encoding="utf-8")
    assert 'id="metarep.core.methods.fo_anil.FOANIL"' in core
    assert ":class:`" not in core, "Sphinx roles must be rewritten by docs/griffe_roles.py"
