"""rlctl: plugin-based reinforcement-learning post-training of language models."""

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Prompt, Rollouts

__version__ = "0.1.0"
__all__ = ["hookimpl", "Prompt", "Rollouts", "__version__"]
