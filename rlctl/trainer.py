"""``rlctl.trainer.Trainer``: the training loop, kept under its long-standing name (see ``rlctl.train``)."""

from rlctl.train.loop import Interrupted, Trainer

__all__ = ["Trainer", "Interrupted"]
