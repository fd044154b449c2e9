"""Find the shard files of a set again: the patterns every ``*_shards`` key accepts
(:func:`expand_shard_pattern`), and what a set's ``index.json`` (written by
:func:`degsr.data.shards.write_shards`) tells about it: the sources packed into it, so that a
validation set overlapping the training images can be named (:func:`sources_overlapping`,
:func:`shards_overlapping`), and those findings as the lines the DataModule warns with, each
naming its config key (:func:`expand_pattern`, :func:`folder_overlaps`, :func:`shards_overlap`)."""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from degsr import console
from degsr.data.samples import is_remote
from degsr.data.shards import LIST_EXT
from degsr.errors import UserError


def _read_index(path: str) -> dict | None:
    """The index.json of a shard set written by :func:`write_shards` (it names its shards), or
    None: missing, unreadable, or another tool's."""
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("shards"), list) else None


def _indexes(urls) -> list[str]:
    """The index.json beside each of ``urls``, once each (whether it exists or not)."""
    return sorted({os.path.join(os.path.dirname(u), "index.json") for u in urls})


def _sources(index_path: str) -> list[str]:
    """The sources a degsr index.json records (none if it is missing or another tool's)."""
    sources = (_read_index(index_path) or {}).get("sources")
    return list(map(str, sources)) if isinstance(sources, list) else []


def sources_overlapping(urls, folder: str) -> list[str]:
    """The sources recorded in the index.json of the shard sets of ``urls`` that are ``folder``,
    hold it or lie inside it: images of ``folder`` that were packed for training. Lists (.txt)
    are not opened; links are resolved."""
    real, found = os.path.realpath(os.path.expanduser(folder)), []
    for src in (s for path in _indexes(urls) for s in _sources(path)):
        s = os.path.realpath(src)
        if not s.lower().endswith(LIST_EXT) and os.path.commonpath([s, real]) in (s, real):
            found.append(src)
    return found


def shards_overlapping(train_urls, val_urls) -> tuple[list[str], list[tuple[str, str]]]:
    """What validation shards share with the training ones: the ``val_urls`` that are training
    shard files too (links resolved), and the (validation source, training source) pairs of
    their index.json that overlap (:func:`sources_overlapping`). A validation set whose index is
    a training one is named by its files alone (its sources would repeat it)."""
    train_files = {os.path.realpath(u) for u in train_urls}
    shared = [u for u in val_urls if os.path.realpath(u) in train_files]
    train_indexes = {os.path.realpath(p) for p in _indexes(train_urls)}
    pairs = [(v, t) for path in _indexes(val_urls) if os.path.realpath(path) not in train_indexes
             for v in _sources(path) if not v.lower().endswith(LIST_EXT)
             for t in sources_overlapping(train_urls, v)]
    return shared, list(dict.fromkeys(pairs))


SHARD_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")  # what a folder of shards holds (gzip: read as is)


def _tars_in(folder: str) -> list[str]:
    """The shard files (``SHARD_GLOBS``) directly in ``folder``, sorted."""
    return sorted(f for g in SHARD_GLOBS for f in glob.glob(os.path.join(glob.escape(folder), g)))


_told_stray: set[str] = set()  # folders whose stray tars were named (in this process)


def _warn_stray_tars(pattern: str, folder: str, index: dict) -> None:
    """Name the ``*.tar`` beside a set's index.json that it does not name: they are not read
    (copied in, or another set's), which would otherwise go unseen. Once per folder and
    process: every setup and validation set expands the pattern again (each DDP rank says it
    once). A malformed index is left to the caller's error."""
    try:
        named = {os.path.normpath(os.path.join(folder, s["file"])) for s in index["shards"]}
    except (KeyError, TypeError):
        return
    tars = _tars_in(folder)
    stray = sorted(os.path.basename(f) for f in tars if os.path.normpath(f) not in named)
    real = os.path.realpath(folder)
    if not stray or real in _told_stray:
        return
    _told_stray.add(real)
    more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
    files, are = ("file", "is") if len(stray) == 1 else ("files", "are")
    console.log.warning(f"{pattern}: {len(stray)} .tar {files} beside its index.json {are} not in "
                        f"the set it names and {are} not read ({', '.join(stray[:3])}{more}); "
                        "name them explicitly or rewrite the set with `degsr shards`")


def expand_shard_pattern(pattern: str) -> list[str]:
    """The shard files a path, glob (``d/*.tar``), brace pattern (``d/t-{000000..000009}.tar``),
    directory or ``index.json`` names: sorted, all existing, else UserError. A directory means
    the set its ``index.json`` names when it has a degsr one (not a stray tar beside it), else
    its shards (``SHARD_GLOBS``: ``*.tar``, gzipped ``*.tar.gz``/``*.tgz``; a tar beside the
    index that it does not name is not read: warned once). A ``.txt`` file lists patterns, one
    a line (relative to its folder; blank lines and ``#`` comments left out). A URL webdataset
    opens (``pipe:CMD``, ``https://``) is read as a stream (:func:`_remote`).
    """
    from braceexpand import braceexpand

    path = os.path.expanduser(str(pattern))
    if is_remote(path):
        return _remote(pattern, path)
    if os.path.isdir(path) and (index := _read_index(os.path.join(path, "index.json"))):
        _warn_stray_tars(pattern, path, index)
        path = os.path.join(path, "index.json")
    if os.path.isdir(path):
        files = _tars_in(path)
    elif os.path.isfile(path) and path.endswith(".json"):
        try:
            index = json.loads(Path(path).read_text(encoding="utf-8"))
            names = [s["file"] for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{pattern}: not a degsr shard index ({e})") from None
        files = [os.path.join(os.path.dirname(path), n) for n in names]
    elif os.path.isfile(path) and path.lower().endswith(LIST_EXT):
        return _listed(pattern, path)
    elif os.path.isfile(path):  # an existing file is itself, whatever [ or { its name holds
        files = [path]
    elif "{" in path:
        files = list(braceexpand(path))
    elif glob.has_magic(path):
        files = glob.glob(path)
    else:
        files = [path]
    files = sorted(set(files))
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or files == missing == [path]:
        raise UserError(f"no shard files match {pattern}")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{pattern}: {len(missing)} of {len(files)} shard files do not exist: "
                        f"{', '.join(missing[:3])}{more}"
                        + _padding_hint(missing[:20]))
    return files


def _padding_hint(missing: list[str]) -> str:
    """``"; <file> exists: ..."`` when a file of the same name but for a number's zero padding
    lies beside one of ``missing`` (``t-{0..9}.tar`` against ``t-000000.tar``), else ``""``.
    Each folder is listed once; a number is ASCII digits only (``int`` reads other digits, or
    refuses them: ``'0\u00b2'``)."""
    listings: dict[str, list[str]] = {}
    numbered: dict[tuple, dict[int, str]] = {}  # (folder, before, after) -> number -> name
    for path in missing:
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = sorted(os.listdir(folder or "."))
            except OSError:
                listings[folder] = []
        for m in reversed(list(re.finditer(r"[0-9]+", name))):
            key = (folder, name[:m.start()], name[m.end():])
            if key not in numbered:
                rx = re.compile(re.escape(key[1]) + r"([0-9]+)" + re.escape(key[2]))
                found = numbered[key] = {}
                for other in listings[folder]:
                    if (hit := rx.fullmatch(other)) is not None:
                        found.setdefault(int(hit.group(1)), other)
            other = numbered[key].get(int(m.group()))
            if other is not None:
                digits = other[m.start():len(other) - len(key[2])]
                pad = "0" * (len(digits) - 1)  # the files' padding: more or less than written
                how = f"{len(digits)} digits" if pad else "without zero padding"
                return (f"; {os.path.join(folder, other)} exists: write the range as its files "
                        f"are numbered, {how} (e.g. {{{pad}0..{pad}9}})")
    return ""


def _remote(pattern: str, url: str) -> list[str]:
    """The URLs of a remote pattern (braces expanded; not checked before they are read: one
    that cannot be read is named as a damaged shard then). UserError for a scheme webdataset's
    ``gopen`` has no reader for (``s3://``): it says how to stream it through a command."""
    from braceexpand import braceexpand
    from webdataset.gopen import gopen_schemes

    scheme = url.split(":", 1)[0]
    if scheme != "pipe" and scheme not in gopen_schemes:
        raise UserError(f"{pattern}: {scheme}:// shards are not read directly; stream them "
                        f"through a command, e.g. 'pipe:aws s3 cp {url} -' (or mount them)")
    return list(dict.fromkeys(braceexpand(url)))


def _listed(pattern: str, path: str) -> list[str]:
    """The shard files of the patterns a ``.txt`` list names, in the order listed, each once."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise UserError(f"{pattern}: cannot read the list of shards ({e})") from None
    found = []
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        if line.lower().endswith(LIST_EXT):
            raise UserError(f"{pattern}: lists another list ({line}); name shards")
        try:  # a path is relative to the list's folder; a URL is itself
            found += expand_shard_pattern(line if is_remote(line) else os.path.join(
                os.path.dirname(path), os.path.expanduser(line)))
        except UserError as e:
            raise UserError(f"{pattern}: {e}") from None
    if not found:
        raise UserError(f"{pattern}: the list names no shard")
    return list(dict.fromkeys(found))


def expand_pattern(key: str, pattern: str) -> list[str]:
    """``expand_shard_pattern`` whose UserError names the config key."""
    try:
        return expand_shard_pattern(pattern)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def folder_overlaps(train_urls: list[str], key: str, folder: str) -> list[str]:
    """Lines naming the training sources that are validation ``folder``, hold it or lie in it."""
    return [f"{key} {folder} overlaps {src}, a source of the training shards"
            for src in sources_overlapping(train_urls, folder)]


def shards_overlap(train_urls: list[str], val_urls: list[str]) -> list[str]:
    """Lines naming what ``data.val_shards`` shares with the training shards: the same shard
    files (one line), sources of the two sets' index.json that overlap (a line each)."""
    shared, pairs = shards_overlapping(train_urls, val_urls)
    more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
    files = [f"data.val_shards: {len(shared)} of its {len(val_urls)} shard files are training "
             f"shards too ({', '.join(shared[:3])}{more})"] if shared else []
    return files + [f"data.val_shards {v}, a source of the validation shards, overlaps {t}, a "
                    "source of the training shards" for v, t in pairs]
