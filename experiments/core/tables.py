"""Table keys from the configuration: what tells the rows of a table apart.

A run's rows carry their essential keys (``{"readout": "sk"}``, ``{"env": "cartpole", "agent": "sk"}``);
every other knob that differs between the records of a table is found here, from the records' configs,
so that a sweep over any knob yields distinct rows (``-m ... sk.head.ridge=0.1,1`` gives two rows, not
one row that keeps the newest run). Nothing is listed by hand: a config path becomes a key when it takes
two or more values among records whose stored row keys are equal.

A report module may narrow a record's config to what its rows depend on (``used_config(config)``, e.g.
an agent that does not read ``sk.head``); the default is the whole config. Never keys: the seed, where
files live, logging, device and thread count (``IGNORED_ROOTS``), and the experiment's name.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

IGNORED_ROOTS = ("seed", "paths", "logger", "hydra", "device", "threads", "objective")
IGNORED_PATHS = ("exp.name",)
ABSENT = "–"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf} of nested dicts; lists are leaves (shown as their JSON-like text)."""
    if not isinstance(node, dict):
        return {prefix: _leaf(node)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = _leaf(value)
    return out


def _leaf(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(_leaf(v)) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return value


def row_config(record: dict, used_config: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """The flattened config of ``record`` that its rows depend on."""
    config = dict(record.get("config") or {})
    if used_config is not None:
        config = used_config(config)
    flat = flatten({k: v for k, v in config.items() if k not in IGNORED_ROOTS})
    return {p: v for p, v in flat.items() if p not in IGNORED_PATHS}


def _row_signature(record: dict) -> tuple:
    return tuple(sorted({tuple(sorted((k, str(v)) for k, v in row["keys"].items())) for row in record["rows"]}))


def derived_keys(records: list[dict], used_config: Callable[[dict], dict] | None = None) -> list[dict[str, Any]]:
    """For each record (in order), ``{config path: value}`` of the knobs that tell its rows apart from the
    rows of other records with the same stored keys; ``ABSENT`` where a record's config lacks such a path.
    Empty dicts when nothing varies."""
    configs = [row_config(r, used_config) for r in records]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[_row_signature(rec)].append(i)
    varying: list[str] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = set().union(*(configs[i] for i in members))
        for path in sorted(paths):
            values = {repr(configs[i].get(path, ABSENT)) for i in members}
            if len(values) > 1 and path not in varying:
                varying.append(path)
    varying.sort()
    return [{p: c.get(p, ABSENT) for p in varying} for c in configs]


def with_derived_keys(records: list[dict], used_config: Callable[[dict], dict] | None = None) -> list[dict]:
    """Copies of ``records`` whose rows' keys include the derived keys (after their own keys)."""
    out = []
    for rec, extra in zip(records, derived_keys(records, used_config)):
        if not extra:
            out.append(rec)
            continue
        rows = [{**row, "keys": {**row["keys"], **{p: v for p, v in extra.items() if p not in row["keys"]}}}
                for row in rec["rows"]]
        out.append({**rec, "rows": rows})
    return out
