"""Plugin manager: loads built-in and third-party plugins and owns the name -> factory tables.

Built-ins are registered from ``DEFAULT_PLUGINS`` with the same marker and hooks as third-party code.
Third-party plugins come from the ``rlctl`` entry-point group; ``RLCTL_LOAD_PLUGINS`` (comma separated
entry-point names, empty for none) restricts which are loaded. Loading happens once, on first use.
A plugin that fails to import is recorded with its error and the others still load.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from rlctl import hookspecs
from rlctl.errors import PluginError

KINDS = ("sampler", "reward", "advantage", "loss", "scheduler", "environment")
_REGISTER_HOOKS = {
    "sampler": "rlctl_register_samplers",
    "reward": "rlctl_register_rewards",
    "advantage": "rlctl_register_advantages",
    "loss": "rlctl_register_losses",
    "scheduler": "rlctl_register_schedulers",
    "environment": "rlctl_register_environments",
}
ENTRY_POINT_GROUP = "rlctl"

DEFAULT_PLUGINS = (
    "rlctl_plugins.samplers",
    "rlctl_plugins.rewards",
    "rlctl_plugins.grpo",
    "rlctl_plugins.policy_loss",
    "rlctl_plugins.sft",
    "rlctl_plugins.schedulers",
    "rlctl_plugins.ppo",
    "rlctl_plugins.dapo",
    "rlctl_plugins.reft",
    "rlctl_plugins.verifiers",
    "rlctl_plugins.code_exec",
    "rlctl_plugins.preference",
    "rlctl_plugins.nested",
    "rlctl_plugins.offpolicy",
    "rlctl_plugins.selection",
    "rlctl_plugins.prefix",
    "rlctl_plugins.curriculum",
    "rlctl_plugins.vllm_sampler",
    "rlctl_plugins.kl_control",
    "rlctl_plugins.cispo",
    "rlctl_plugins.sapo",
    "rlctl_plugins.gmpo",
    "rlctl_plugins.cov_losses",
    "rlctl_plugins.gpg",
    "rlctl_plugins.baselines",
    "rlctl_plugins.remax",
    "rlctl_plugins.preference_variants",
    "rlctl_plugins.multi_turn",
)


@dataclass(frozen=True)
class Component:
    name: str
    kind: str
    factory: Callable[..., Any]
    plugin: str  # plugin (module / entry point) that registered it
    package: str  # distribution that ships the plugin
    version: str


@dataclass
class Registry:
    manager: pluggy.PluginManager
    tables: dict[str, dict[str, Component]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> error message
    # (kind, name) -> message for names registered twice: using such a name is an error, but the
    # other components keep working, so one bad plugin does not break every command
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> Component:
        _check_kind(kind)
        table = self.tables[kind]
        if (kind, name) in self.conflicts:
            raise PluginError(self.conflicts[(kind, name)])
        if name in table:
            return table[name]
        message = f"{kind} {name!r} is not available (plugin may not be installed)."
        close = difflib.get_close_matches(name, list(table), n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        message += f" Available: {', '.join(sorted(table)) or 'none'}."
        if self.failed:
            message += " Plugins that failed to load: " + "; ".join(
                f"{plugin} ({err})" for plugin, err in self.failed.items()
            )
        raise PluginError(message)


_registry: Registry | None = None
_lock = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, loading plugins on first call."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _load()
        return _registry


def reset() -> None:
    """Forget loaded plugins (tests; after installing a plugin package at run time)."""
    global _registry
    with _lock:
        _registry = None
    importlib.invalidate_caches()


def get(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as ``name`` for ``kind``; raises ``PluginError`` listing what exists."""
    return registry().get(kind, name).factory


def available(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    _check_kind(kind)
    return sorted(registry().tables[kind])


def components() -> list[Component]:
    reg = registry()
    return [c for kind in KINDS for c in sorted(reg.tables[kind].values(), key=lambda c: c.name)]


def hook() -> Any:
    """The pluggy hook relay, for calling observer hooks."""
    return registry().manager.hook


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def _load() -> Registry:
    pm = pluggy.PluginManager("rlctl")
    pm.add_hookspecs(hookspecs)
    reg = Registry(manager=pm)
    owners: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)
    rlctl_version = _version("rlctl")

    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)  # a broken built-in is a bug: let it raise
        pm.register(module, name=module_name)
        owners[module_name] = ("rlctl", rlctl_version)

    wanted = os.environ.get("RLCTL_LOAD_PLUGINS")
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        dist = getattr(ep, "dist", None)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # one broken plugin must not break the others
            reg.failed[ep.name] = f"Error importing plugin {ep.name!r}: {type(exc).__name__}: {exc}"
            continue
        owners[ep.name] = (dist.name if dist else ep.name, dist.version if dist else "?")

    try:
        pm.check_pending()  # hookimpls that match no spec (typos) are errors
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc

    for kind, hook_name in _REGISTER_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            package, version = owners.get(impl.plugin_name, (impl.plugin_name, "?"))
            register = _registrar(reg, kind, impl.plugin_name, package, version)
            try:
                impl.function(register=register)
            except Exception as exc:
                reg.failed[impl.plugin_name] = f"{hook_name} failed: {type(exc).__name__}: {exc}"
    return reg


def _registrar(reg: Registry, kind: str, plugin: str, package: str, version: str) -> Callable:
    def register(name: str, factory: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} with a non-callable factory")
        table = reg.tables[kind]
        if name in table:
            other = table[name]
            reg.conflicts[(kind, name)] = (
                f"duplicate {kind} name {name!r}: registered by {other.plugin} "
                f"({_qualname(other.factory)}) and by {plugin} ({_qualname(factory)}); "
                "uninstall one of the two plugins"
            )
            return
        table[name] = Component(name, kind, factory, plugin, package, version)

    return register


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "0+unknown"
