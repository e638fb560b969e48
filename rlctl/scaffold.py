"""``rlctl new``: recipes from the shipped templates and pip-installable plugin packages.

Also the introspection shared by ``rlctl plugins --verbose``, generated recipes and the reference docs:
what options a component factory (or a data source) accepts, read from its signature.

Recipe templates are the recipes shipped in the ``rlctl_recipes`` package (``recipes/*.toml`` in the
source tree), so a template and the recipe ``rlctl run NAME`` trains are the same file. Plugin templates
live in ``rlctl/templates/plugin`` and are filled with ``string.Template``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import keyword
import re
import string
import sys
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, get_args, get_origin

from rlctl.errors import RlctlError

PLUGIN_KINDS = ("sampler", "reward", "advantage", "loss", "scheduler", "observer", "environment")
DEFAULT_PLUGIN_KINDS = ("reward",)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED_MODULES = {"rlctl", "rlctl_plugins", "rlctl_recipes", "test", "tests"}


class ScaffoldError(RlctlError):
    """``rlctl new`` cannot write what was asked (bad name, unknown template, existing file)."""


# ====================================================================== factory introspection
_MISSING = object()


@dataclass(frozen=True)
class OptionInfo:
    """One keyword option of a component factory: a key its recipe table accepts."""

    name: str
    annotation: Any  # the resolved type hint, or inspect.Parameter.empty
    default: Any  # _MISSING when the option is required

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def type_text(self, sep: str = " | ") -> str:
        return type_text(self.annotation, sep)

    def default_text(self) -> str:
        """``required``, ``unset`` (a None default: leave the key out) or the default as TOML."""
        if self.required:
            return "required"
        return "unset" if self.default is None else toml_value(self.default)


@dataclass(frozen=True)
class FactoryInfo:
    summary: str  # first paragraph of the docstring, on one line ("" when undocumented)
    options: tuple[OptionInfo, ...]
    takes_any: bool  # the factory also accepts **options (any key)


def describe_factory(factory: Callable[..., Any]) -> FactoryInfo:
    """The options ``factory(**options)`` accepts (name, type, default) and its docstring summary.

    Uses the same signature and type hints that ``rlctl.recipe.check_call`` checks recipes against.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return FactoryInfo(doc_summary(factory), (), True)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: show the options untyped
        hints = {}
    options = []
    takes_any = False
    for name, param in sig.parameters.items():
        if param.kind == param.VAR_KEYWORD:
            takes_any = True
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        default = _MISSING if param.default is param.empty else param.default
        options.append(OptionInfo(name, hints.get(name, param.annotation), default))
    return FactoryInfo(doc_summary(factory), tuple(options), takes_any)


def doc_summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring joined into one line ("" without a docstring)."""
    doc = inspect.getdoc(obj) if inspect.isclass(obj) or callable(obj) else None
    if not doc or (inspect.isclass(obj) and obj.__doc__ is None and doc == inspect.getdoc(object)):
        return ""
    paragraph = doc.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def type_text(annotation: Any, sep: str = " | ") -> str:
    """A short, readable type: ``float``, ``float | None``, ``"a" | "b"``, ``list``, ``any``."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    if annotation is type(None):
        return "None"
    origin = get_origin(annotation)
    if origin is Literal:
        return sep.join(toml_value(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return sep.join(type_text(a, sep) for a in get_args(annotation))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def toml_value(value: Any) -> str:
    """``value`` as it is written in a recipe (``None``, which TOML lacks, is ``none``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _default_column(option: OptionInfo) -> str:
    text = option.default_text()
    return f"({text})" if option.required or option.default is None else f"= {text}"


def format_options(info: FactoryInfo, indent: str = "  ") -> list[str]:
    """Aligned ``name: type = default`` lines (what ``rlctl plugins --verbose`` prints)."""
    if not info.options:
        lines = [] if info.takes_any else [f"{indent}(no options)"]
    else:
        width = max(len(o.name) for o in info.options)
        twidth = max(len(o.type_text()) for o in info.options)
        lines = [f"{indent}{o.name:<{width}}  {o.type_text():<{twidth}}  {_default_column(o)}"
                 for o in info.options]
    if info.takes_any:
        lines.append(f"{indent}(also accepts any other key)")
    return lines


# =========================================================================== recipe templates
def recipe_templates() -> dict[str, Path]:
    """Template name -> file: every recipe shipped in ``rlctl_recipes``."""
    root = resources.files("rlctl_recipes")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml") and entry.is_file():
            out[entry.name[: -len(".toml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name`` (``quickstart``, ``grpo`` ...), or None."""
    return recipe_templates().get(name)


def template_summary(path: Path) -> str:
    """The first paragraph of a recipe file's leading comment, on one line (its description)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if words or stripped:
                break
            continue
        text = stripped.lstrip("#").strip()
        if not text:
            if words:
                break
            continue
        words.append(text)
    return " ".join(words)


def new_recipe(name: str, template: str, output: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write recipe ``name`` from ``template``; returns the files written (the recipe first).

    ``output`` is a ``.toml`` file, or a folder that gets ``NAME.toml`` (default: ``./NAME.toml``). Files a
    template includes (``include = "..."``) are copied next to it, so that the new recipe stands alone.
    """
    templates = recipe_templates()
    if template not in templates:
        from difflib import get_close_matches

        close = get_close_matches(template, list(templates), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ScaffoldError(f"unknown recipe template {template!r}{hint} Templates: "
                            f"{', '.join(templates) or 'none'} (rlctl new recipe --list)")
    stem = name[: -len(".toml")] if name.endswith(".toml") else name
    if not stem or not _NAME.match(stem):
        raise ScaffoldError(f"recipe name {name!r}: use letters, digits, '_' and '-', starting with a letter")
    if output is None:
        target = Path(f"{stem}.toml")
    else:
        target = Path(output)
        if target.is_dir() or not target.suffix:  # a folder (made if missing) gets NAME.toml
            target = target / f"{stem}.toml"
    source = templates[template]
    text = source.read_text(encoding="utf-8")
    files = {target: _recipe_header(target, template) + text + _options_appendix(source)}
    for inc in _includes(source):
        files[target.parent / inc] = (source.parent / inc).read_text(encoding="utf-8")
    _write_files(files, force)
    return list(files)


def _includes(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """Relative paths of the files ``path`` includes, recursively (relative to ``path``'s folder)."""
    from rlctl.recipe import tomllib

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScaffoldError(f"template {path.name}: invalid TOML: {exc}") from None
    found = doc.get("include", [])
    found = [found] if isinstance(found, str) else list(found)
    out = []
    for inc in found:
        if path in seen or Path(inc).is_absolute() or ".." in Path(inc).parts:
            continue
        out.append(inc)
        sub = [str(Path(inc).parent / s) for s in _includes(path.parent / inc, (*seen, path))]
        out.extend(s for s in sub if s not in out)
    return out


def _recipe_header(target: Path, template: str) -> str:
    name = target.name
    commands = [(f"rlctl validate {name}", "check it and print every resolved value"),
                (f"rlctl run {name}", f"train (into runs/{target.stem}/ unless [train] output_dir is set)"),
                (f"rlctl run {name} --set train.steps=10", "change any value for one run")]
    width = max(len(c) for c, _ in commands)
    return (
        f"# {name}: made with `rlctl new recipe {target.stem} --from {template}`.\n"
        + "".join(f"#   {c:<{width}}  {what}\n" for c, what in commands)
        + "# Every key is described in the recipe reference (docs/recipe-reference.md); the options of the\n"
        "# components used here are listed at the end of this file (`rlctl plugins --verbose`: all of them).\n"
        "#\n"
    )


def _options_appendix(source: Path) -> str:
    """Commented list of the options of every component the recipe uses, with their defaults."""
    from rlctl import plugins
    from rlctl.errors import PluginError
    from rlctl.recipe import COMPONENT_SECTIONS, read_toml_with_includes

    try:
        doc = read_toml_with_includes(source)
    except RlctlError:
        return ""
    used: list[tuple[str, str]] = []

    def collect(tables: dict[str, Any]) -> None:
        for kind in COMPONENT_SECTIONS:
            value = tables.get(kind)
            for item in value if isinstance(value, list) else [value]:
                use = item.get("use") if isinstance(item, dict) else None
                if isinstance(use, str) and (kind, use) not in used:
                    used.append((kind, use))

    collect(doc)
    for stage in doc.get("stage", []) if isinstance(doc.get("stage"), list) else []:
        if isinstance(stage, dict):
            collect(stage)
    if not used:
        return ""
    lines = ["", "", "# " + "-" * 98,
             "# Options of the components this recipe uses (defaults shown). To change one, add the key to",
             "# the table that selects the component, e.g. under [loss]: clip_high = 0.28",
             "# " + "-" * 98]
    for kind, use in sorted(used, key=lambda ku: (COMPONENT_SECTIONS.index(ku[0]), ku[1])):
        try:
            comp = plugins.registry().get(kind, use)
        except PluginError:
            lines.append(f"# {kind} {use!r}: not installed")
            continue
        info = describe_factory(comp.factory)
        lines.append(f"# {kind} {use!r} ({comp.package})" + (f": {info.summary}" if info.summary else ""))
        lines.extend("#" + line for line in format_options(info, indent="   "))
    return "\n".join(lines) + "\n"


# ============================================================================ plugin packages
@dataclass(frozen=True)
class PluginNames:
    dist: str  # the distribution (pip) name, as given
    module: str  # the import package
    cls: str  # CamelCase prefix of the example classes


def plugin_names(name: str) -> PluginNames:
    """Check a plugin name; ``my-plugin`` -> distribution ``my-plugin``, package ``my_plugin``."""
    if not _NAME.match(name or ""):
        raise ScaffoldError(f"plugin name {name!r}: use letters, digits, '_' and '-', starting with a letter "
                            "(e.g. rlctl-my-reward)")
    module = name.replace("-", "_").lower()
    if keyword.iskeyword(module) or module in _RESERVED_MODULES or module in sys.stdlib_module_names:
        raise ScaffoldError(f"plugin name {name!r}: the package {module!r} would shadow an existing module; "
                            "choose another name")
    cls = "".join(part[:1].upper() + part[1:] for part in re.split(r"[_-]+", name) if part)
    return PluginNames(dist=name, module=module, cls=cls)


def parse_kinds(values: Iterable[str]) -> tuple[str, ...]:
    """``("reward", "loss,advantage")`` -> kinds in canonical order; ``all`` selects every kind."""
    kinds: set[str] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                kinds.update(PLUGIN_KINDS)
            elif part in PLUGIN_KINDS:
                kinds.add(part)
            else:
                raise ScaffoldError(f"--kind {part!r}: accepted kinds are {', '.join(PLUGIN_KINDS)}, all")
    return tuple(k for k in PLUGIN_KINDS if k in kinds) or DEFAULT_PLUGIN_KINDS


# imports each kind's example code needs: (group, line); groups sort stdlib < third party < rlctl
_IMPORTS: dict[str, list[tuple[int, str]]] = {
    "sampler": [(0, "import dataclasses"), (0, "from typing import Sequence"),
                (2, "from rlctl import Prompt, Rollouts"), (2, "from rlctl.generation import generate"),
                (2, "from rlctl.models import Policy")],
    "reward": [(1, "import torch"), (2, "from rlctl import Rollouts")],
    "advantage": [(1, "import torch"), (2, "from rlctl import Rollouts"),
                  (2, "from rlctl.ops import broadcast_to_tokens, group_mean_std")],
    "loss": [(1, "import torch"), (2, "from rlctl import Rollouts"),
             (2, "from rlctl.ops import AGGREGATIONS, aggregate, masked_mean")],
    "scheduler": [(2, "from rlctl.state import TrainState")],
    "observer": [(0, "import json"), (0, "from pathlib import Path"), (0, "from typing import Mapping"),
                 (2, "from rlctl.state import TrainState")],
    "environment": [(2, "from rlctl import Prompt"), (2, "from rlctl.environments import Step, Turn")],
}
_TEST_IMPORTS: dict[str, list[tuple[int, str]]] = {
    "sampler": [(2, "from rlctl import Prompt")],
    "reward": [],
    "advantage": [(1, "import torch")],
    "loss": [(1, "import torch")],
    "scheduler": [(2, "from rlctl.state import TrainState")],
    "observer": [(0, "import json"), (2, "from rlctl.state import TrainState")],
    "environment": [(2, "from rlctl import Prompt"), (2, "from rlctl.environments import Turn")],
}
# recipe tables for kinds the plugin does not provide: built-ins that fit the example task
_BUILTIN_SECTIONS = {
    "sampler": '[sampler]\nuse = "hf"\nmax_new_tokens = 4\n',
    "reward": '[[reward]]\nuse = "exact"\n',
    "advantage": '[advantage]\nuse = "grpo"\n',
    "loss": '[loss]\nuse = "ppo_clip"\n',
    "scheduler": "",
}


def _templates() -> Any:
    return resources.files("rlctl") / "templates" / "plugin"


def _fill(relative: str, values: dict[str, str]) -> str:
    text = (_templates() / relative).read_text(encoding="utf-8")
    try:
        return string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:  # a broken template is a bug in rlctl
        raise RuntimeError(f"template {relative}: {type(exc).__name__}: {exc}") from exc


def _import_block(groups: Iterable[tuple[int, str]]) -> str:
    """Import lines grouped (stdlib, third party, rlctl) and sorted, merging ``from m import a, b``."""
    plain: list[set[str]] = [set(), set(), set()]
    names: list[dict[str, set[str]]] = [{}, {}, {}]
    for group, line in groups:
        if line.startswith("from "):
            module, _, imported = line[len("from "):].partition(" import ")
            names[group].setdefault(module, set()).update(n.strip() for n in imported.split(","))
        else:
            plain[group].add(line)

    def order(name: str) -> tuple[int, str]:  # constants, classes, functions (isort's default)
        return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)

    blocks = []
    for group in range(3):
        lines = sorted(plain[group]) + [_from_import(m, sorted(n, key=order))
                                        for m, n in sorted(names[group].items())]
        if lines:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _from_import(module: str, names: list[str], width: int = 100) -> str:
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= width:
        return line
    return f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")"


def _all_list(names: list[str], width: int = 100) -> str:
    line = f"__all__ = [{', '.join(json.dumps(n) for n in names)}]"
    if len(line) <= width:
        return line
    return "__all__ = [\n" + "".join(f"    {json.dumps(n)},\n" for n in names) + "]"


def new_plugin(name: str, kinds: Iterable[str] = DEFAULT_PLUGIN_KINDS, output: str | Path | None = None,
               force: bool = False) -> Path:
    """Write a pip-installable plugin package ``NAME/`` under ``output`` (default: the current folder).

    The package provides one working example component per kind in ``kinds`` (registered under the
    package name), tests that use ``rlctl.testing``, a README and a recipe that trains with them.
    Returns the package directory.
    """
    from rlctl import __version__

    names = plugin_names(name)
    kinds = parse_kinds([kinds] if isinstance(kinds, str) else kinds)
    root = Path(output or ".") / names.dist
    values = {
        "dist": names.dist,
        "module": names.module,
        "Class": names.cls,
        "rlctl_version": __version__,
        "kinds": ", ".join(kinds),
        "component_list": _component_list(names, kinds),
    }
    components = "\n\n".join(_fill(f"components/{kind}.py.tmpl", values).strip("\n") for kind in kinds)
    tests = "\n\n".join(_fill(f"tests/{kind}.py.tmpl", values).strip("\n") for kind in kinds)
    exported = [f"{names.cls}{kind.capitalize()}" for kind in kinds if kind != "observer"]
    registered = tuple(kind for kind in kinds if kind != "observer")
    values.update(
        imports=_import_block([(2, "from rlctl import hookimpl"),
                               *(line for kind in kinds for line in _IMPORTS[kind])]),
        components=components,
        init_exports=(f"\n{_from_import(names.module + '.plugin', sorted(exported))}\n\n"
                      f"{_all_list(sorted(exported))}" if exported else ""),
        test_imports=_import_block([(0, "import math"), (0, "from importlib import metadata"),
                                    (0, "from pathlib import Path"), (1, "import pytest"),
                                    (2, "from rlctl import plugins, testing"),
                                    *(line for kind in kinds for line in _TEST_IMPORTS[kind])]),
        test_plugin_imports=_from_import(names.module + ".plugin", sorted(exported)) + "\n" if exported else "",
        registered_kinds=f"({', '.join(json.dumps(k) for k in registered)}{',' if len(registered) == 1 else ''})",
        tests=tests,
        recipe_sections=_recipe_sections(kinds, values),
    )
    pkg = root / "src" / names.module
    files = {
        root / "pyproject.toml": _fill("pyproject.toml.tmpl", values),
        root / "README.md": _fill("README.md.tmpl", values),
        root / ".gitignore": _fill("gitignore.tmpl", values),
        pkg / "__init__.py": _fill("package/__init__.py.tmpl", values),
        pkg / "plugin.py": _fill("package/plugin.py.tmpl", values),
        root / "tests" / f"test_{names.module}.py": _fill("tests/test_plugin.py.tmpl", values),
        root / "recipes" / "example.toml": _fill("recipes/example.toml.tmpl", values),
    }
    if root.exists() and any(root.iterdir()) and not force:
        raise ScaffoldError(f"{root} already exists and is not empty; pass --force to write into it "
                            "(files of the same name are replaced)")
    _write_files(files, force=True)
    return root


def _component_list(names: PluginNames, kinds: tuple[str, ...]) -> str:
    rows = []
    for kind in kinds:
        if kind == "observer":
            rows.append("| observer | (every run) | `rlctl_on_run_start`, `rlctl_on_step_end`, "
                        "`rlctl_on_run_end` |")
        else:
            table = {"reward": "[[reward]]", "environment": "[sampler.env]"}.get(kind, f"[{kind}]")
            rows.append(f'| {kind} | `{table} use = "{names.module}"` | `{names.cls}{kind.capitalize()}` |')
    return "\n".join(rows)


def _recipe_sections(kinds: tuple[str, ...], values: dict[str, str]) -> str:
    sections = []
    for kind in ("sampler", "reward", "advantage", "loss", "scheduler"):
        if kind in kinds:
            sections.append(_fill(f"recipes/{kind}.toml.tmpl", values).strip("\n") + "\n")
        elif kind == "sampler" and "environment" in kinds:  # the multi-turn sampler, with this environment
            sections.append(_fill("recipes/environment.toml.tmpl", values).strip("\n") + "\n")
        elif kind == "reward" and "environment" in kinds:  # the environment's own rewards
            sections.append('[[reward]]\nuse = "env_return"\n')
        elif _BUILTIN_SECTIONS[kind]:
            sections.append(_BUILTIN_SECTIONS[kind])
    return "\n".join(sections).rstrip("\n")


def _write_files(files: dict[Path, str], force: bool) -> None:
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise ScaffoldError(f"{existing[0]} already exists; pass --force to overwrite it")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def dataclass_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, comment) for each field of a recipe-section dataclass.

    The comment is the ``# ...`` text after the field in the source, used as its description.
    """
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    for line in source.splitlines():
        match = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = _MISSING
        text = "required" if default is _MISSING else "unset" if default is None else toml_value(default)
        rows.append((f.name, type_text(hints[f.name], " or "), text, comments.get(f.name, "")))
    return rows
