"""The image files under a folder, as every command that takes a folder finds them."""

from __future__ import annotations

import os
from pathlib import Path


def files_under(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files below ``root`` whose suffix (any case) is one of ``suffixes``, sorted. Symlinked
    folders are followed (a dataset assembled from links to other disks), each real folder
    once: a link loop or a folder reached twice is not read again."""
    seen, found = set(), []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [Path(folder, f) for f in files if os.path.splitext(f)[1].lower() in suffixes]
    return sorted(found)
