"""Where a checkpoint is written: never over a file, never over someone else's folder unasked, and never
deleting a file it did not write.

The checkpoint is written into a new temporary folder beside the target and then swapped in (one
``renameat2(RENAME_EXCHANGE)`` where Linux has it, else two renames), so a reader sees the old folder or
the new one, and an interrupted save leaves the target as it was. The target may be missing, an empty
folder, or a prunelib checkpoint (replaced); a folder of other files only with ``overwrite=True``; a file,
a symbolic link or anything else never. Of the old folder only the files a prunelib save wrote there (the
names and sizes its structure file keeps) are deleted; every other file moves into the new folder, or, where the new
checkpoint has a file of the same name, stays in a ``<name>.replaced-<time>`` folder beside it (a warning
says so).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from prunelib.model.checkpoint_checks import STRUCTURE_FILE
from prunelib.model.checkpoint_kinds import CheckpointError

#: what a prunelib save wrote in a folder whose structure file names no list (older formats, a damaged file)
WRITTEN_BEFORE = frozenset({"config.json", "model.safetensors", STRUCTURE_FILE, "prunelib_state.safetensors",
                            "prunelib_structure.pt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"})


def is_checkpoint(path: Path) -> bool:
    return (path / STRUCTURE_FILE).is_file() or (path / "prunelib_structure.pt").is_file()


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target that :func:`install` may not replace."""
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link: nothing saved (save to the folder it points to)")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a folder: nothing saved (a checkpoint never replaces a file)")
    if path.is_dir() and not overwrite and not is_checkpoint(path):
        names = sorted(p.name for p in path.iterdir())
        if names:
            raise CheckpointError(f"{path} holds {len(names)} files that are not a prunelib checkpoint ({names[:5]}"
                                  f"{' ...' if len(names) > 5 else ''}): nothing saved. Choose a new folder, or pass "
                                  "overwrite=True to save there (those files are kept)")


def new_folder(path: Path) -> Path:
    """A new empty temporary folder beside ``path`` (only this save uses it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def written_by_save(path: Path) -> dict:
    """The files a prunelib save wrote in ``path``, name -> size (None: any size); empty if it is not a checkpoint."""
    import json

    if not is_checkpoint(path):
        return {}
    try:
        files = json.loads((path / STRUCTURE_FILE).read_bytes()).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        files = None
    if isinstance(files, dict) and all(isinstance(n, str) and isinstance(k, int) for n, k in files.items()):
        return {**files, STRUCTURE_FILE: None}
    return dict.fromkeys(WRITTEN_BEFORE)


def manifest(folder: Path) -> dict:
    """Name -> size of the files in ``folder`` (what this save wrote)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def install(tmp: Path, path: Path) -> Path:
    """Swap the finished folder ``tmp`` in at ``path``; keep every file of the old folder a save did not write."""
    if not path.exists() and not path.is_symlink():
        os.rename(tmp, path)
        return path
    check_target(path, overwrite=True)  # still a folder (it may have changed since the save began)
    ours = written_by_save(path)
    if _exchange(tmp, path):
        old = tmp
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        old.rmdir()
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)
            raise
    kept = []
    for entry in sorted(old.iterdir()):
        if entry.name in ours and entry.is_file() and not entry.is_symlink() and \
                ours[entry.name] in (None, entry.stat().st_size):
            entry.unlink()  # a file this folder's save wrote (same name and size)
        elif not os.path.lexists(path / entry.name):
            os.rename(entry, path / entry.name)  # someone else's file: it stays in the folder
        else:
            kept.append(entry.name)
    if not kept:
        old.rmdir()
        return path
    backup = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    while os.path.lexists(backup):
        backup = backup.with_name(backup.name + "_")
    os.rename(old, backup)
    warnings.warn(f"{path}: files of the old folder that the new checkpoint also has ({kept}) were not written by "
                  f"a prunelib save and are kept in {backup}", stacklevel=3)
    return path


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
