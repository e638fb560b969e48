"""Old path of ``rlctl.models.lora``: importing it gives that module itself, so names patched here reach it."""

import sys

import rlctl.models.lora as _moved

sys.modules[__name__] = _moved
