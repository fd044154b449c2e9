"""Collect finished runs into one markdown table (``degsr collect``), e.g. for an ablation suite.

A **run directory** is a folder holding ``config.yaml`` (the resolved config ``degsr fit`` writes
at start; a YAML mapping with ``stage`` and ``run`` keys) and, once ``degsr fit`` has ended,
``final.json``: ``{"run_name", "stage", "global_step", "status", "metrics": {name: float}}``.
A path that is not a run directory is searched **recursively** for run directories (the search
does not descend into a run directory, nor into hidden, ``wandb`` or ``checkpoints`` folders;
it follows symbolic links to folders, each folder walked once).

A run without ``final.json`` is **listed**, with status ``unfinished`` (``failed`` when the last
line of its ``events.jsonl`` is an ``error`` event) and the step of that last event; its metrics
come from the newest W&B summary in the run directory (``wandb/*run-*/files/wandb-summary.json``,
written by online runs) when there is one, otherwise they are ``–``.

The table has one row per run: name, stage, status, step, then the config keys whose values
differ between the collected runs (bookkeeping keys such as ``run.name`` and ``logger.tags`` left
out; a section with more than ``max_keys_per_section`` differing keys becomes one ``section.*``
column whose values A, B, ... name the distinct settings), then the metrics matching
``metrics`` (glob patterns), sorted by name. Runs of both stages give one table per stage.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from degsr import console
from degsr.config import flatten
from degsr.errors import UserError

MISSING = "–"
IGNORED_KEYS = {"stage", "run.name", "run.dir", "logger.group", "logger.tags", "logger.project",
                "logger.mode"}
SKIP_DIRS = {"wandb", "checkpoints"}


@dataclass
class Run:
    path: Path
    name: str
    stage: str
    status: str
    step: int | None
    config: dict[str, object]          # dotted key -> value
    metrics: dict[str, float] = field(default_factory=dict)


def _read_config(path: Path) -> dict | None:
    """The run config in ``path/config.yaml``, or None when it isn't a degsr run config."""
    try:
        data = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) and "stage" in data and "run" in data else None


def find_run_dirs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run directories given directly or found (recursively) under the given folders."""
    found: list[Path] = []
    seen: set[Path] = set()  # folders walked, resolved: a link back up is not a loop forever
    for item in paths:
        root = Path(item).expanduser()
        if not root.exists():
            raise UserError(f"{item}: no such folder")
        if not root.is_dir():
            raise UserError(f"{item}: not a folder (give a run directory or a folder of runs)")
        # Links followed: a folder of symlinks to run directories elsewhere (scratch) is common.
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            here = Path(dirpath)
            if here.resolve() in seen:
                dirnames[:] = []
                continue
            seen.add(here.resolve())
            if _read_config(here) is not None:
                found.append(here)
                dirnames[:] = []
            else:
                dirnames[:] = sorted(d for d in dirnames
                                     if not d.startswith(".") and d not in SKIP_DIRS)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"no run directories (folders with a degsr config.yaml) under "
                        f"{', '.join(str(p) for p in paths)}")
    return unique


def _text(path: Path) -> str:
    """A file's text, "" when it cannot be read. Bytes that are not UTF-8 (a line cut inside a
    character by a kill, a file overwritten with garbage) become U+FFFD: such a file is one
    row's problem, not a traceback that loses the whole table."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _json(text: str) -> dict | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _numbers(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}


def read_run(path: Path) -> Run:
    config = _read_config(path) or {}
    flat = flatten(config)
    name = str(flat.get("run.name", path.name))
    if path.name.startswith(name):  # under a W&B sweep the folder is <run.name>-<W&B run id>
        name = path.name
    run = Run(path=path, name=name, stage=str(config.get("stage")), status="unfinished",
              step=None, config=flat)
    final = path / "final.json"
    if final.is_file():
        doc = _json(_text(final))
        if doc is not None:
            run.name = str(doc.get("run_name") or run.name)
            run.status, run.step = str(doc.get("status") or "finished"), doc.get("global_step")
            metrics = doc.get("metrics")
            run.metrics = _numbers(metrics) if isinstance(metrics, dict) else {}
            return run
        console.log.warning(f"warning: {final}: not a JSON object; listed as unfinished")
    log = path / "events.jsonl"  # start / preempt / end / error lines, each with the step
    events = _text(log).splitlines() if log.is_file() else []
    event = next((e for e in map(_json, reversed(events)) if e is not None), {})
    run.status = "failed" if event.get("event") == "error" else run.status
    run.step = event.get("step") if isinstance(event.get("step"), int) else None
    summaries = sorted((path / "wandb").glob("*run-*/files/wandb-summary.json"),
                       key=lambda p: p.stat().st_mtime)
    summary = _json(_text(summaries[-1])) if summaries else None
    if summary:
        step = summary.get("trainer/global_step", summary.get("_step"))
        run.step = int(step) if isinstance(step, (int, float)) else run.step
        run.metrics = _numbers(summary)
    return run


def _fmt(value: object) -> str:
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]  # null, true, false: as in a config file
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def _cell(text: str) -> str:
    """Text as one table cell: '|' escaped; a line break (``\\n``, ``\\r\\n`` or a lone ``\\r``, all
    of which end a markdown line) a space, or the row would break in two."""
    return " ".join(text.replace("|", "\\|").splitlines())


def differing_keys(runs: list[Run], max_keys_per_section: int = 6) -> list[tuple[str, list[str]]]:
    """``[(column, [cell per run])]`` for the config keys whose values differ between runs."""
    absent = object()
    keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS)
    diff = [k for k in keys if len({repr(r.config.get(k, absent)) for r in runs}) > 1]
    columns: list[tuple[str, list[str]]] = []
    for section in dict.fromkeys(k.split(".")[0] for k in diff):
        sub = [k for k in diff if k.split(".")[0] == section]
        if len(sub) <= max_keys_per_section:
            columns += [(k, [_fmt(r.config[k]) if k in r.config else MISSING for r in runs])
                        for k in sub]
            continue
        labels: dict[str, str] = {}
        cells = []
        for r in runs:
            sig = repr([r.config.get(k, absent) for k in sub])
            cells.append(labels.setdefault(sig, chr(ord("A") + len(labels))))
        columns.append((f"{section}.* ({len(sub)} keys)", cells))
    return columns


def _sort_value(cell: str):
    """Numbers by value, then text; a NaN (it compares false with everything and would scramble
    the other rows) after them, with the missing cells."""
    try:
        value = float(cell)
    except ValueError:
        return (0 if cell != MISSING else 2, 0.0, cell)
    return (0, value, "") if value == value else (2, 0.0, cell)


def markdown_table(runs: list[Run], metrics: list[str] = ("val*",), sort: str | None = None,
                   descending: bool = False, max_keys_per_section: int = 6) -> str:
    """The runs as a markdown table (see the module docstring for the columns)."""
    names = [r.name for r in runs]
    shown = [str(r.path) if names.count(r.name) > 1 else r.name for r in runs]
    columns = [("name", shown), ("stage", [r.stage for r in runs]),
               ("status", [r.status for r in runs]),
               ("step", [MISSING if r.step is None else str(r.step) for r in runs])]
    columns += differing_keys(runs, max_keys_per_section)
    metric_names = sorted({m for r in runs for m in r.metrics
                           if any(fnmatch.fnmatchcase(m, p) for p in metrics)})
    columns += [(m, [_fmt(r.metrics[m]) if m in r.metrics else MISSING for r in runs])
                for m in metric_names]
    header = [c for c, _ in columns]
    rows = [[cells[i] for _, cells in columns] for i in range(len(runs))]
    if sort in header:
        i = header.index(sort)
        rows.sort(key=lambda row: _sort_value(row[i]), reverse=descending)
        if descending:  # keep missing values last either way
            rows.sort(key=lambda row: _sort_value(row[i])[0] == 2)
    lines = ["| " + " | ".join(_cell(c) for c in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def collect(paths: list[str | os.PathLike], sort: str | None = None,
            **table_options) -> tuple[str, list[Run]]:
    """Find the runs under ``paths``; return (markdown, runs): one table, or one per stage under
    a ``## <stage>`` heading when the runs are of both stages (their configs hardly compare)."""
    runs = [read_run(p) for p in find_run_dirs(paths)]
    stages = {r.stage: [q for q in runs if q.stage == r.stage] for r in runs}
    tables = {st: markdown_table(rs, sort=sort, **table_options) for st, rs in stages.items()}
    columns = list(dict.fromkeys(c for t in tables.values() for c in _header(t)))
    if sort is not None and sort not in columns:
        raise UserError(f"--sort {sort}: not a column; columns: {', '.join(columns)}")
    if len(tables) == 1:
        return next(iter(tables.values())), runs
    return "\n".join(f"## {st}\n\n{t}" for st, t in sorted(tables.items())), runs


def _header(table: str) -> list[str]:
    """The column names of a table as given to ``--sort`` (a '|' in a name unescaped)."""
    return [c.strip().replace("\\|", "|")
            for c in table.split("\n")[0].strip("| ").split(" | ")]
