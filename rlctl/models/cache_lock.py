"""Building an entry of the model cache once, whatever the number of processes asking for it.

Every builder follows the same steps: check the entry's marker, take an exclusive lock next to the entry,
check the marker again (another process may have built it while this one waited), build into a fresh
temporary directory beside the entry and rename it into place, so that no process ever sees a
half-written entry. The ranks of one run, and separate runs sharing a cache, build an entry once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlctl.errors import RlctlError


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: in the rlctl cache (``locks/``), named by the target's absolute path, so
    that nothing is written beside a directory of the user's; it stays, so every process locks one file."""
    import hashlib

    from rlctl.models.policy import cache_dir

    digest = hashlib.sha256(str(Path(target).expanduser().absolute()).encode()).hexdigest()[:24]
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{Path(target).name}-{digest}.lock"


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file`` (released when the process dies, so never stale)."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def fresh_dir(target: Path) -> Path:
    """A new, empty directory beside ``target`` to build it in (with the usual permissions: a shared cache
    is read by every user). Call it while holding ``target``'s lock."""
    path = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    path.chmod(0o777 & ~_umask())
    return path


def remove_stale(target: Path) -> None:
    """Remove what a killed builder of ``target`` left behind. Only the holder of ``target``'s lock builds it,
    so while it is held every temporary directory of ``target`` is a leftover."""
    prefix = _temp_prefix(target)
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def save_model_here(model: Any, directory: Path) -> None:
    """``model.save_pretrained(directory)`` from whichever process holds the lock.

    transformers (5.x) writes nothing but the tokenizer from a process other than rank 0 of an initialised
    process group, whatever ``is_main_process`` says; the lock holder may be any rank (and on a node with a
    cache of its own, no process is rank 0). The written files are checked, so that an entry without its
    weights is never renamed into place.
    """
    if hasattr(model, "should_save_on_this_rank"):
        model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(directory, safe_serialization=True)
    mask = _umask()
    for written in directory.iterdir():  # some are written private (temporary file renamed); a cache is shared
        if written.is_file() and not written.is_symlink():
            written.chmod(0o666 & ~mask)
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        raise RlctlError(f"{directory}: save_pretrained wrote no config.json or weights")
