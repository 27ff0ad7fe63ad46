"""The SK benchmark (``scripts/bench_sk.py``), one module a section.

- ``timing``: the clock (interleaved medians, device synchronisation), number formatting, the log.
- ``provenance``: what a report says about its run: commit, command, machine, software, load average
  at start and end, and whether other work contaminated the timings.
- ``sizes``: the full and quick sizes of every section.
- ``ratio`` (sections 1-2), ``scaling`` (3), ``memory`` (4), ``classes`` (5), ``fashion`` (6),
  ``small`` (7): each has ``section(sizes, threads) -> list[str]``, which measures and returns its own
  Markdown.
- ``device``: the GPU section (on the CPU only as a check of its code path).

Adding a section: a module with ``section(sizes, threads)``, its sizes in ``sizes``, one entry in
``SECTIONS`` in ``scripts/bench_sk.py``.
"""
