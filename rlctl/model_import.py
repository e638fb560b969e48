"""Old path of ``rlctl.models.gguf``: importing it gives that module itself, so names patched here reach it."""

import sys

import rlctl.models.gguf as _moved

sys.modules[__name__] = _moved
