"""Errors that the CLI reports as one clear line instead of a traceback."""

from __future__ import annotations


class RlctlError(Exception):
    """Base class: a user-facing error whose message says what is wrong and what is accepted."""


class RecipeError(RlctlError):
    """A recipe that cannot run. ``problems`` holds every problem found, one line each."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class PluginError(RlctlError):
    """A plugin could not be loaded, or a component name is unknown or registered twice."""


class ComponentError(RlctlError):
    """An exception raised inside a component, re-raised naming the plugin, kind and recipe section."""


class DataError(RlctlError):
    """A data source or row that cannot be used (rows are named by number)."""


class RolloutsUnavailable(RlctlError):
    """A sampler's inference engine (e.g. a rollout server) could not produce rollouts after its retries.

    The trainer answers it by writing a checkpoint from which the failed step is taken again on resume.
    """
