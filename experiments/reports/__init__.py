"""Reports: what a table says about its records. One module per experiment, ``experiments/reports/<exp>.py``.

The experiment module runs and writes records; its report module reads records and nothing else (it never
trains or imports the runner). ``scripts/make_tables.py`` builds ``results/<exp>.{md,csv,tex}`` and calls the
report's hooks, all optional (docs/INTERFACES.md, "Reports"):

- ``comparisons(records) -> list[str]``: Markdown lines under the table of one section (one profile and
  setting; the newest configuration of each row, one record per seed): paired differences with intervals,
  verdicts, ranges and headlines. Numbers come from ``experiments.core.stats`` and are written with
  ``experiments.core.format``.
- ``summarize(records) -> list[dict]``: an extra table of one section.
- ``make_figure(records, path)``: ``results/<exp>.png`` from every record of the table.
- ``extra_figures(records) -> [(file name, draw(path)), ...]``: more figures, ``<exp>_*.png``.
- ``used_config(config) -> dict``: the part of a record's config its rows depend on (for the table keys
  derived from the configuration, ``experiments.core.tables``).
"""
import importlib
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """The report module of experiment ``name``, or None when it has none."""
    try:
        return importlib.import_module(f"experiments.reports.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"experiments.reports.{name}":
            raise
        return None
