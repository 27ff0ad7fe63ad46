"""Every number in the README's results section comes from a table in results/.

What counts as a number (``readme_numbers``), in the section that starts with ``RESULTS_HEADING``:

- compounds, checked whole: ``mean ± std`` (``88.32 ± 0.25``), ranges with an en dash (``0.04–2.36``)
  and bracketed intervals (``[−207, +188]``);
- every other decimal or integer (``79.34``, ``1,290``, ``+12.8``, ``6``), as a whole token: ``0.3`` does
  not match inside ``0.313``.

A number quoted in the README must appear, as the same token, in some ``results/*.md`` (compounds as
compounds; a lone number anywhere, inside a compound too, so that a mean can be quoted without its std).
Signs are compared after mapping − to - and dropping +; thousands separators are ignored.

Not numbers: digits inside names and code (``CIFAR-10``, ``ViT-S/16``, ``CartPole-v1``, ``Lite0``, inline
code spans and links), digits joined to a word by a hyphen or a letter (``2-core``, ``5-epoch``, ``50k``),
and the protocol numbers of ``ALLOWED`` (seeds, draws, epochs, class ranges, a CI's level).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_HEADING = "## What the quick profiles measured"

# Protocol descriptions, not measurements: removed before the numbers are read.
ALLOWED = [
    r"\b\d+ seeds?\b",          # "3 seeds": how many runs, set by the Make target
    r"\b\d+ draws?\b",          # "5 draws per shot count"
    r"\b\d+ epochs?\b",         # training budgets, set by the profile
    r"\bclasses \d+–\d+",       # "classes 0–4": which classes a model was trained on
    r"\b\d+ ?% (?:bootstrap )?(?:CI|confidence)",  # "95 % bootstrap CI": the interval's level
]

_NUM = r"[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# A number starts after a space or punctuation (not after a letter, digit, '.', '/', '_' or 'letter-')
# and ends before one (not before a letter, digit, '_', '.digit' or '-letter').
_B = r"(?<![\w./])(?<![A-Za-z]-)"
_E = r"(?![\w]|\.\d|-[A-Za-z])"
NUMBER = re.compile(_B + _NUM + _E)
COMPOUNDS = [
    ("pm", re.compile(_B + rf"({_NUM})\s*±\s*({_NUM})" + _E)),
    ("range", re.compile(_B + rf"({_NUM})–({_NUM})" + _E)),
    ("interval", re.compile(rf"\[\s*({_NUM}),\s*({_NUM})\s*\]")),
]
_JOIN = {"pm": " ± ", "range": "–", "interval": ", "}


def _norm(num: str) -> str:
    return num.replace("−", "-").replace(",", "").lstrip("+")


def _strip_markup(text: str) -> str:
    text = re.sub(r"`[^`]*`", " ", text)                      # inline code: commands, paths, settings
    text = re.sub(r"\]\([^)]*\)", "] ", text)                 # link targets
    return text


def readme_numbers(text: str) -> set[str]:
    """The numbers a text quotes: compounds whole, then the lone numbers outside them."""
    text = _strip_markup(text)
    for pattern in ALLOWED:
        text = re.sub(pattern, " ", text)
    found = set()
    for kind, rx in COMPOUNDS:
        for m in rx.finditer(text):
            found.add(kind + ":" + _JOIN[kind].join(_norm(g) for g in m.groups()))
        text = rx.sub(" ", text)
    found |= {_norm(m.group()) for m in NUMBER.finditer(text)}
    return found


def table_numbers(text: str) -> set[str]:
    """The numbers a table holds: every compound, and every number, inside a compound or not."""
    found = {_norm(m.group()) for m in NUMBER.finditer(text)}
    for kind, rx in COMPOUNDS:
        found |= {kind + ":" + _JOIN[kind].join(_norm(g) for g in m.groups()) for m in rx.finditer(text)}
    return found


def misquoted(readme_section: str, tables: list[str]) -> list[str]:
    available = set().union(*(table_numbers(t) for t in tables)) if tables else set()
    return sorted(n.split(":", 1)[-1] for n in readme_numbers(readme_section) - available)


def results_section(readme: str) -> str:
    start = readme.find("\n" + RESULTS_HEADING)
    assert start >= 0, f"README.md has no section {RESULTS_HEADING!r}"
    end = readme.find("\n## ", start + 1)
    return readme[start + len(RESULTS_HEADING) + 1: end if end >= 0 else None]


TABLE = """
| probe | test_acc (%) | chosen |
|---|---|---|
| linear | 79.34 ± 0.75 | C=10 |
| sk | 78.67 ± 1.01 | lengthscale=0.313 |

- linear − SK over blocks: 0.04–2.36 points; paired difference +12.8 [−207, +188]; 1290 parameters
"""


@pytest.mark.parametrize("quote,bad", [
    ("the linear probe led by 0.3–2.4 points", ["0.3–2.4"]),      # the misquoted range of issue 13
    ("the linear probe led by 0.04–2.36 points", []),
    ("linear 79.34 ± 0.75 %, SK 78.67 %", []),                     # a mean quoted without its std
    ("linear 79.3 ± 0.75 %", ["79.3 ± 0.75"]),                      # a rounded mean is not the table's
    ("lengthscale 0.3", ["0.3"]),                                   # no match inside 0.313
    ("+12.8 [−207, +188] with 1,290 parameters", []),              # signs and separators normalised
    ("+12.8 [−200, +188]", ["-200, 188"]),
    ("SK cost about 6× more", ["6"]),
    ("on CIFAR-10 with ViT-S/16 on the 2-core CPU, 5-epoch head, `make test 42`, 3 seeds, classes 0–4", []),
    ("95 % bootstrap CI [−207, +188] over 5 seeds", []),
])
def test_number_check_is_strict(quote, bad):
    assert misquoted(quote, [TABLE]) == bad


def test_results_section_is_found_and_bounded():
    text = f"# T\n\n## Other\n1.5\n{RESULTS_HEADING} (CPU)\n\n- 7.25 %\n\n## Tests\n9.75\n"
    assert readme_numbers(results_section(text)) == {"7.25"}


def test_readme_numbers_come_from_the_tables():
    section = results_section((ROOT / "README.md").read_text())
    tables = [p.read_text() for p in sorted((ROOT / "results").glob("*.md"))]
    assert readme_numbers(section), "the README's results section quotes no number at all"
    bad = misquoted(section, tables)
    assert not bad, f"numbers in the README's results section found in no results/*.md: {bad}"
