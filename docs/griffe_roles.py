"""Griffe extension of metarep's API reference (``extensions:`` of the mkdocstrings handler in
``mkdocs.yml``).

metarep's docstrings cross-reference with Sphinx roles (``:class:`~metarep.errors.ConfigError```,
``:func:`run_experiment```), which Markdown does not know. Once the package is loaded, this
extension rewrites every role into Markdown: a cross-reference ``[`title`][path]`` when the
target resolves (in the scope of the documented object, as Python would look the name up) to an
object that the reference renders, and plain code ``title`` otherwise (a private helper, an
undocumented constant, another package's name). ``~`` keeps only the last part of the name as
the title, as in Sphinx. So a link can never point at nothing, and ``mkdocs build --strict``
stays clean whatever a docstring names.

It also documents every name where it is defined: a name a package re-exports (an import
listed in its ``__all__``) is not rendered a second time on the package.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

PACKAGE = "metarep"
"""Only names of this package become cross-references."""

ROLE = re.compile(
    r":(?:py:)?(?P<role>mod|class|func|meth|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`"
)
"""A Sphinx cross-reference role: ``:role:`target```, ``:role:`~target```."""

EXPLICIT_TITLE = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>")
"""Sphinx's ``title <target>`` form inside a role."""

LOOKUP_ERRORS = (KeyError, ValueError, griffe.NameResolutionError, griffe.AliasResolutionError,
                 griffe.CyclicAliasError)


def convert_roles(text: str, resolve: Callable[[str, str], str | None]) -> str:
    """``text`` with every Sphinx role replaced by Markdown.

    ``resolve(role, target)`` maps a role (``mod``, ``class``, ...) and its target (as written,
    ``()`` stripped) to the identifier of a rendered object, or ``None``; a resolved role
    becomes ``[`title`][identifier]``, any other one ``title`` in code.
    """

    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        explicit = EXPLICIT_TITLE.fullmatch(target)
        if explicit:
            title, target = explicit["title"], explicit["target"].strip()
        else:
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        identifier = resolve(match["role"], target.removesuffix("()"))
        code = f"`{title}`"
        return f"[{code}][{identifier}]" if identifier else code

    return ROLE.sub(replace, text)


def is_rendered(obj: griffe.Object) -> bool:
    """Whether the API reference renders ``obj`` (an object, not an alias): every part of its
    path is public and documented (itself or through a member), as the handler's filters
    (``!^_``, no object without docstrings) require."""
    if obj.path.split(".")[0] != PACKAGE:
        return False
    current: griffe.Object | None = obj
    while current is not None:
        if current.name.startswith("_") or not (current.is_module or current.has_docstrings):
            return False
        current = current.parent
    return True


def _documented(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object defined inside it (aliases left out), depth first."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _documented(member)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles into Markdown cross-references and hide re-exported names."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Once ``pkg`` is loaded: convert the roles of every docstring in it."""
        if pkg.name != PACKAGE:
            return
        objects = list(_documented(pkg))
        for obj in objects:
            if obj.is_module:
                for member in obj.members.values():
                    if member.is_alias:
                        member.public = False  # documented where it is defined
        scope = Scope(loader.modules_collection, [obj for obj in objects if is_rendered(obj)])
        for obj in objects:
            if obj.docstring is not None:
                resolve = functools.partial(scope.resolve, obj)
                obj.docstring.value = convert_roles(obj.docstring.value, resolve)


class Scope:
    """Finds what a role's target names, seen from a documented object."""

    def __init__(self, collection: griffe.ModulesCollection, rendered: list[griffe.Object]):
        self.collection = collection
        self.by_name: dict[str, list[griffe.Object]] = {}
        for obj in rendered:
            self.by_name.setdefault(obj.name, []).append(obj)

    def resolve(self, obj: griffe.Object, role: str, target: str) -> str | None:
        """The identifier of the rendered object that ``target`` names in the scope of ``obj``,
        or ``None``.

        A dotted ``metarep....`` target is absolute; any other is looked up as Python would
        from ``obj`` (its members, then its parents'). A bare name a package's docstring
        mentions without importing it (``:func:`run_sweep``` in ``metarep.sweeps``) names the
        one rendered object of that name inside the package, when there is exactly one. A role
        other than ``:mod:`` that finds a module ``m`` names ``m.m`` (``:func:`collect``` in
        ``metarep.sweeps``: the function of the module of the same name).
        """
        target = re.sub(r"\s+", "", target)
        found = self._lookup(obj, target)
        if found is not None and found.is_module and role != "mod":
            found = _final(found.members.get(found.name))
        if found is None and "." not in target:
            package = _package_of(obj)
            inside = [candidate for candidate in self.by_name.get(target, [])
                      if candidate.path.startswith(f"{package.path}.")]
            found = inside[0] if len(inside) == 1 else None
        return found.path if found is not None and is_rendered(found) else None

    def _lookup(self, obj: griffe.Object, target: str) -> griffe.Object | None:
        try:
            if target != PACKAGE and not target.startswith(f"{PACKAGE}."):
                first, dot, rest = target.partition(".")
                target = obj.resolve(first) + dot + rest
            return _final(self.collection[target])
        except LOOKUP_ERRORS:
            return None


def _final(obj: griffe.Object | griffe.Alias | None) -> griffe.Object | None:
    """What ``obj`` stands for: an alias's final target (``None`` when it cannot be found)."""
    if obj is None or not obj.is_alias:
        return obj
    try:
        return obj.final_target
    except LOOKUP_ERRORS:
        return None


def _package_of(obj: griffe.Object) -> griffe.Object:
    """The innermost package (an ``__init__`` module) holding ``obj``."""
    current = obj if obj.is_module else obj.module
    while not current.is_init_module and current.parent is not None:
        current = current.parent
    return current
