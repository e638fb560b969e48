"""Old path of ``rlctl.models.generation``: importing it gives that module itself, so names patched here reach it."""

import sys

import rlctl.models.generation as _moved

sys.modules[__name__] = _moved
