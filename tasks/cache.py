"""A content-addressed result cache shared by jobs: Fisher stores (by checkpoint + data + settings) and evaluations of
parents (by checkpoint + eval settings) are computed once and linked into every workspace that needs them."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tasks.params import Params
from tasks.registry import content_digest, params_hash

log = logging.getLogger(__name__)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the filesystem allows (cached results are never modified)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def checkpoint_digest(path: Path, known: str | None = None) -> str:
    return known or content_digest(path)


def cached(params: Params, kind: str, key_parts: dict, dest: Path, compute: Callable[[Path], None]) -> bool:
    """Fill `dest` from the cache entry for `key_parts`, computing it (into a scratch folder, then renamed into the
    cache) on a miss. Returns True on a hit. `dest` must not exist; it appears complete or not at all."""
    key = params_hash(key_parts)
    entry = params.root / "cache" / kind / key
    hit = entry.is_dir()
    if not hit:
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = entry.parent / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            compute(scratch)
            try:
                os.rename(scratch, entry)
            except OSError:  # another job filled the same entry meanwhile: identical content, keep theirs
                shutil.rmtree(scratch, ignore_errors=True)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    log.info("%s cache %s: %s → %s", kind, "hit" if hit else "miss (computed)", key, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(entry, tmp)
    os.rename(tmp, dest)
    return hit
