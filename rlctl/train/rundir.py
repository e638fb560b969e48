"""Run directories: claiming, marking and clearing them.

A run directory carries a marker file, ``.rlctl-run``: a JSON manifest of the top-level entries that rlctl
writes there (``metrics.jsonl``, ``checkpoints/``, ``final/`` ...). rlctl deletes only entries listed in a
manifest (and its own temporary directories, named ``.rlctl-tmp-*``), so a user's files next to a run are
never touched:

* a missing or empty directory is claimed: created and marked;
* a marked directory that holds a run is refused unless ``overwrite``; then the entries of its manifest are
  removed and nothing else;
* a non-empty directory without a marker is refused unless ``overwrite``; even then nothing in it is
  removed, and it is refused if it already holds an entry the run would write (say the user's ``final/``);
* ``/``, the home directory and the current directory (and the directories above them) are refused
  outright.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from rlctl.errors import RecipeError, RlctlError

MARKER = ".rlctl-run"
TMP_PREFIX = ".rlctl-tmp-"
# what a run writes at the top of its directory (trackers may add a directory of their own)
RUN_ENTRIES = ("recipe.resolved.toml", "versions.json", "metrics.jsonl", "checkpoints", "final", "summary.json")
_SETUP_ENTRIES = ("recipe.resolved.toml", "versions.json")  # written before the first step
PLACEHOLDERS = "{recipe}"


# ------------------------------------------------------------------------------------- the path
def format_output_dir(template: str, recipe_name: str, key: str = "[train] output_dir") -> Path:
    """``template`` with ``{recipe}`` filled in and ``~`` expanded. Raises ``RecipeError`` (one line)."""
    try:
        text = template.format(recipe=recipe_name)
    except KeyError as exc:
        problem = f"unknown placeholder {{{exc.args[0]}}}" if exc.args else "unknown placeholder"
    except IndexError:
        problem = "positional placeholders ({} or {0}) are not accepted"
    except (AttributeError, ValueError, TypeError) as exc:
        problem = f"not a valid path template ({exc})"
    else:
        return Path(text).expanduser()
    raise RecipeError(f"{key} = {template!r}: {problem}; the accepted placeholder is {PLACEHOLDERS} "
                      "(write {{ and }} for literal braces)")


def check_output_dir(path: Path, key: str = "[train] output_dir", given: str | None = None) -> Path:
    """Refuse ``/``, the home directory and the current directory (and what lies above them)."""
    real = Path(os.path.realpath(path))
    protected: list[tuple[str, Path]] = [("the current directory", Path(os.path.realpath(os.getcwd())))]
    home = os.path.expanduser("~")
    if home and home != "~":
        protected.append(("the home directory", Path(os.path.realpath(home))))
    if real == Path(real.anchor):
        what = "the filesystem root"
    else:
        what = next((f"{name} ({place})" for name, place in protected if real == place), "") or next(
            (f"above {name} ({place})" for name, place in protected if real in place.parents), "")
    if what:
        shown = str(path) if given is None else given
        raise RecipeError(f"{key} = {shown!r}: is {what}; rlctl never runs in it or clears it. "
                          "Accepted: a directory of the run's own, e.g. runs/{recipe}")
    return path


def output_dir_path(template: str, recipe_name: str, explicit: str | Path | None = None) -> Path:
    """The run directory: ``--output-dir`` as given, or ``[train] output_dir`` filled in; checked."""
    if explicit:
        return check_output_dir(Path(explicit).expanduser(), key="--output-dir", given=str(explicit))
    return check_output_dir(format_output_dir(template, recipe_name), given=template)


# ------------------------------------------------------------------------------- the manifest
def is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file() and not (path / MARKER).is_symlink()


def manifest(run_dir: Path) -> list[str]:
    """The top-level entries rlctl wrote in ``run_dir`` (empty without a marker)."""
    if not is_run_dir(run_dir):
        return []
    try:
        data = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
        entries = data["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RlctlError(f"{run_dir / MARKER}: unreadable run marker; accepted: the JSON file rlctl writes "
                         "(move the directory aside or choose another output directory)") from None
    return [e for e in entries if _safe_name(e)] if isinstance(entries, list) else []


def record(run_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the manifest of ``run_dir`` (nothing happens in an unmarked directory)."""
    if not is_run_dir(run_dir):
        return
    entries = manifest(run_dir)
    added = [n for n in names if _safe_name(n) and n not in entries]
    if added:
        _write_manifest(run_dir, [*entries, *added])


def owns(path: Path) -> bool:
    """True if rlctl wrote ``path`` (a top-level entry of a marked run directory)."""
    return path.name in manifest(path.parent)


def _safe_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MARKER) and "/" not in name
            and "\\" not in name and "\0" not in name)


def _write_manifest(run_dir: Path, entries: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=run_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"rlctl_run": 1, "entries": entries}, fh, indent=1)
    os.replace(tmp, run_dir / MARKER)


# --------------------------------------------------------------------------- claim and clear
def run_entries(recipe: Any) -> tuple[str, ...]:
    """The top-level entries a run of ``recipe`` writes (with trackers: their log directory too)."""
    return (*RUN_ENTRIES, *([recipe.name] if recipe.train.trackers else []))


def check_claim(run_dir: Path, *, overwrite: bool = False, resume: bool = False,
                entries: Iterable[str] = RUN_ENTRIES, key: str = "output_dir") -> list[str]:
    """Raise the ``RlctlError`` that ``claim`` would raise, without writing anything."""
    entries = [e for e in dict.fromkeys(entries) if _safe_name(e)]
    check_output_dir(run_dir, key=key)
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        raise RlctlError(f"{key} {run_dir}: exists and is not a directory; accepted: a new or empty "
                         "directory, or an rlctl run directory")
    if is_run_dir(run_dir):
        owned = manifest(run_dir)
        ran = [n for n in owned if n not in _SETUP_ENTRIES and (run_dir / n).exists()]
        if ran and not overwrite and not resume:
            raise RlctlError(f"run directory {run_dir} already holds a run; pass --overwrite to replace it "
                             "or --output-dir to choose another")
        _refuse_clashes(run_dir, [n for n in entries if n not in owned and (run_dir / n).exists()], key)
        return entries
    existing = sorted(os.listdir(run_dir)) if run_dir.is_dir() else []
    if existing:
        if resume:
            raise RlctlError(f"{key} {run_dir}: not an rlctl run directory (no {MARKER}); resume into the "
                             "directory of the run the checkpoint belongs to, or a new one")
        if not overwrite:
            raise RlctlError(f"{key} {run_dir}: not empty and not an rlctl run directory (no {MARKER}); "
                             "choose a new or empty directory, or pass --overwrite to write the run next to "
                             "its files (rlctl deletes only what it wrote)")
        _refuse_clashes(run_dir, [n for n in entries if n in existing], key)
    return entries


def claim(run_dir: Path, *, overwrite: bool = False, resume: bool = False,
          entries: Iterable[str] = RUN_ENTRIES, key: str = "output_dir") -> None:
    """Make ``run_dir`` this run's directory (see the module docstring); raises ``RlctlError``."""
    entries = check_claim(run_dir, overwrite=overwrite, resume=resume, entries=entries, key=key)
    if is_run_dir(run_dir):
        if not resume:
            clear(run_dir)
        owned = manifest(run_dir)
        _write_manifest(run_dir, [*owned, *(n for n in entries if n not in owned)])
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(run_dir, entries)


def _refuse_clashes(run_dir: Path, clash: list[str], key: str) -> None:
    if clash:
        raise RlctlError(f"{key} {run_dir}: holds {', '.join(clash)}, which rlctl did not write and never "
                         "deletes; move them away or choose another output directory")


def clear(run_dir: Path) -> list[str]:
    """Remove the entries of ``run_dir``'s manifest and rlctl's temporary directories; nothing else."""
    removed = []
    names = manifest(run_dir)
    names += [n for n in os.listdir(run_dir) if n.startswith(TMP_PREFIX)] if is_run_dir(run_dir) else []
    for name in names:
        path = run_dir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    if is_run_dir(run_dir):
        _write_manifest(run_dir, [])
    return removed


# ---------------------------------------------------------------------------- atomic outputs
def temp_dir(parent: Path) -> Path:
    """A fresh directory in ``parent`` to write an output into before it is moved in place."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    mask = os.umask(0o022)
    os.umask(mask)
    path.chmod(0o777 & ~mask)  # mkdtemp makes it private; the output gets the usual permissions
    return path


def install(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; an existing ``path`` is replaced only if rlctl wrote it."""
    if path.exists() or path.is_symlink():
        if not owns(path):
            raise RlctlError(f"{path}: exists and was not written by rlctl, so it is not replaced; the new "
                             f"output is in {tmp}")
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
        path.rename(old / path.name)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    record(path.parent, [path.name])
