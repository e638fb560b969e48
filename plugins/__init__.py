"""Built-in rlctl plugins (installed as ``rlctl_plugins``), one module per algorithm family.

Each module implements the same registration hooks a third-party plugin does; see ``rlctl.hookspecs``.
"""
