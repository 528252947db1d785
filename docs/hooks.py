"""MkDocs hooks of metarep's documentation site (declared under ``hooks:`` in ``mkdocs.yml``).

Generated content is filled in at build time, so the site cannot drift from the code:

- :data:`KEYS_MARKER` is replaced by :func:`metarep.run.schema.key_table`, the table of every
  config key (the one ``metarep keys`` prints and README shows);
- ``<!-- cli-options: NAME -->`` (:data:`CLI_MARKER`) is replaced by the table of the arguments
  and options of ``metarep NAME``, read from the command itself (:func:`cli_table`);
- :data:`RESULTS_MARKER` is replaced by README's results block (between
  ``<!-- results:start -->`` and ``<!-- results:end -->``, written by
  ``docs/update_results.py``), with the figure paths made relative to the docs folder.

The functions take and return plain strings, so the tests call them without MkDocs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from metarep.run.schema import key_table

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (this file is ``docs/hooks.py``)."""

KEYS_MARKER = "<!-- config-keys -->"
"""Where a page wants the generated table of config keys."""

CLI_MARKER = re.compile(r"<!-- cli-options: (?P<command>[a-z-]+) -->")
"""Where a page wants the table of a ``metarep`` command's arguments and options."""

RESULTS_MARKER = "<!-- readme-results -->"
"""Where a page wants README's results block."""

RESULTS_START, RESULTS_END = "<!-- results:start -->\n", "<!-- results:end -->"


def readme_results(readme: str) -> str:
    """README's results block, its image paths (``docs/results/...``) made relative to the
    docs folder (``results/...``)."""
    if RESULTS_START not in readme or RESULTS_END not in readme:
        raise ValueError("README.md has no results block (<!-- results:start/end --> markers)")
    block = readme.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0]
    return block.replace("](docs/results/", "](results/").strip()


def cli_commands() -> dict[str, Any]:
    """The ``metarep`` commands by name (click commands, in the order of ``metarep --help``)."""
    from typer.main import get_command

    from metarep.cli import app

    return dict(get_command(app).commands)  # type: ignore[attr-defined]


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: rich's escaped brackets unescaped, pipes escaped,
    on one line."""
    return " ".join(text.replace("\\[", "[").replace("|", "\\|").split())


def _default(param: Any) -> str:
    """What a table says of an option's default ('' when there is nothing to say)."""
    help_text = getattr(param, "help", None) or ""
    if "[default:" in help_text or param.default is None or param.param_type_name != "option":
        return ""
    if param.is_flag:
        if param.secondary_opts:  # --progress / --no-progress: name the one in force
            return f" Default: `{(param.opts if param.default else param.secondary_opts)[0]}`."
        return ""
    if param.default in ((), []):
        return ""
    return f" Default: `{param.default}`."


def cli_table(command: str) -> str:
    """A Markdown table of the arguments and options of ``metarep command``, from the command's
    own definition (names, help texts, defaults)."""
    commands = cli_commands()
    if command not in commands:
        raise ValueError(f"metarep has no command {command!r}; it has {', '.join(commands)}")
    params = commands[command].params
    if not params:
        return f"`metarep {command}` takes no arguments or options."
    rows = ["| argument or option | meaning |", "| --- | --- |"]
    for param in params:
        if param.param_type_name == "argument":
            names = f"`{param.name.upper()}`"
        else:
            names = " / ".join(", ".join(f"`{name}`" for name in group)
                               for group in (param.opts, param.secondary_opts) if group)
        help_text = getattr(param, "help", None) or ""
        rows.append(f"| {names} | {_cell(help_text + _default(param))} |")
    return "\n".join(rows)


def fill_markers(markdown: str, readme: str | None = None) -> str:
    """``markdown`` with every marker replaced: :data:`KEYS_MARKER` by the config key table,
    :data:`CLI_MARKER` by a command's option table, :data:`RESULTS_MARKER` by README's results
    block (``readme``: README's text, read from the repository when needed and not given)."""
    if KEYS_MARKER in markdown:
        markdown = markdown.replace(KEYS_MARKER, key_table())
    markdown = CLI_MARKER.sub(lambda match: cli_table(match["command"]), markdown)
    if RESULTS_MARKER in markdown:
        if readme is None:
            readme = (ROOT / "README.md").read_text(encoding="utf-8")
        markdown = markdown.replace(RESULTS_MARKER, readme_results(readme))
    return markdown


def on_page_markdown(markdown: str, /, *, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the generated parts of a page before it is rendered."""
    return fill_markers(markdown)
