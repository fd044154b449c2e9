"""The image files under a folder, as every command that takes a folder finds them."""

from __future__ import annotations

import os
from pathlib import Path

# The image files a folder holds, for every command and config key that takes a folder (sr,
# degrade, estimate, shards, data.val_folder); PIL decodes them all (TIFF and BMP are re-encoded
# as PNG when packed into shards).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def files_under(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files below ``root`` whose suffix (any case) is one of ``suffixes``, sorted. Symlinked
    folders are followed (a dataset assembled from links to other disks), each real folder
    once: a link loop or a folder reached twice is not read again (a real folder is read under
    its own name rather than a link's, whatever the order the file system lists them in).
    Hidden files and folders (a name starting with ``.``) are left out, as a glob's ``*`` and
    ``degsr eval`` leave them: macOS's ``._x.jpg`` resource forks are no images, and a NAS's
    ``.@__thumb/x.jpg`` thumbnail is not the photo ``x.jpg`` (it took the photo's output name)."""
    seen, found = set(), []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        # the order the file system lists folders in (hash order, differs between copies) must
        # not decide the name a folder reached twice is read under: its own name first, then
        # links, each by name; so data.val_folder's first N images and shard sources are the same
        # on every machine
        subfolders[:] = sorted((d for d in subfolders if not d.startswith(".")),
                               key=lambda d: (os.path.islink(os.path.join(folder, d)), d))
        found += [Path(folder, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes]
    return sorted(found)
