"""``python -m rlctl`` (used with ``torchrun -m rlctl run ...`` for multi-process training)."""

from rlctl.cli import main

main()
