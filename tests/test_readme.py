"""The README's results section quotes the tables' claims and comparison rows verbatim, each naming its table,
section and row (scripts/readme_results.py), and states no measured number outside that generated block.

The check must fail when a quoted number is moved to another row, when its sign is flipped, when a verdict is
changed, and when a number is written into the prose: each is tried on a small table below."""
from __future__ import annotations

from pathlib import Path

from scripts import readme_results as rr

ROOT = Path(__file__).resolve().parents[1]

TABLE = """# cnn_readout

## Profile `quick`

- Runs: 10 (seeds 0, 1)

### Comparisons

- Paired differences:
  - `sk_frozen − linear_joint`: +0.26 [−0.09, +0.62] points, n = 10 seeds (paired t, Holm over 2, 95 % family-wise): **not separated**
  - `sk_e2e − linear_joint`: −1.42 [−1.71, −1.20] points, n = 10 seeds (paired t, Holm over 2, 95 % family-wise): **worse**
- **Claim** (the paper's): SK reads out. Tested as: each of `sk_frozen − linear_joint` better. **Verdict: not shown**, from `sk_frozen − linear_joint` (not separated).
"""


def _readme(tmp_path: Path, prose: str = "The claim was not shown.") -> tuple[str, Path]:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "cnn_readout.md").write_text(TABLE)
    text = f"# SK\n\n{rr.RESULTS_HEADING} (CPU)\n\n{prose}\n\n{rr.block(results)}\n\n## Tests\n\nmake test\n"
    return text, results


def test_the_block_quotes_each_claim_and_the_rows_it_cites_naming_table_section_and_row(tmp_path):
    text, results = _readme(tmp_path)
    assert rr.check(text, results) == []
    block = rr.block(results)
    assert "**CNN readout** (`results/cnn_readout.md`, Profile quick):" in block
    assert "  - row `sk_frozen − linear_joint`: +0.26 [−0.09, +0.62] points, n = 10 seeds" in block
    assert "sk_e2e" not in block  # a row no claim cites is not quoted


def test_moving_a_number_to_another_row_flipping_its_sign_or_its_verdict_fails(tmp_path):
    text, results = _readme(tmp_path)
    quoted = "`sk_frozen − linear_joint`: +0.26 [−0.09, +0.62]"
    for bad in ("`sk_e2e − linear_joint`: +0.26 [−0.09, +0.62]",      # the same numbers, another row
                "`sk_frozen − linear_joint`: −0.26 [−0.09, +0.62]",    # a flipped sign
                "`sk_frozen − linear_joint`: +0.62 [−0.09, +0.62]"):   # another number
        assert quoted in text and rr.check(text.replace(quoted, bad), results), bad
    assert rr.check(text.replace("(not separated).\n  - row", "(better).\n  - row"), results)
    assert rr.check(text.replace("**not separated**", "**better**"), results)


def test_a_measured_number_in_the_prose_fails_and_protocol_integers_do_not(tmp_path):
    for prose, ok in (("SK led by +0.26 points.", False), ("SK reached 88.71 % accuracy.", False),
                      ("the interval [−0.09, +0.62] crosses 0", False), ("88.71 ± 0.40", False),
                      ("With 10 seeds a class and 5 shots, `make demo` takes minutes on CIFAR-10.", True)):
        text, results = _readme(tmp_path, prose)
        assert (rr.check(text, results) == []) == ok, prose


def test_a_readme_without_the_block_fails(tmp_path):
    text, results = _readme(tmp_path)
    start, end = text.index(rr.BEGIN), text.index(rr.END) + len(rr.END)
    assert rr.check(text[:start] + text[end:], results)


def test_the_readme_quotes_the_committed_tables_exactly():
    problems = rr.check((ROOT / "README.md").read_text(), ROOT / "results")
    assert not problems, "\n".join(problems) + "\n(rebuild the tables, then run python scripts/readme_results.py)"


TWO_SETTINGS = """# transfer

## Profile `quick`

- Differences in test accuracy, SK − each probe:
- `a->b`:
  - `SK − linear, 1 shot a class`: +15.89 [+8.00, +23.79] points, n = 10 seeds (paired t, Holm over 2, 95 % family-wise): **better**
- `a->b`, range of SK − probe over n: linear 15.89
- **Claim** (the paper's): (`a->b`) SK transfers. Tested as: each of `SK − linear, 1 shot a class` better. **Verdict: held**, from `SK − linear, 1 shot a class` (better).
- `c->d`:
  - `SK − linear, 1 shot a class`: +3.57 [−4.31, +11.45] points, n = 10 seeds (paired t, Holm over 2, 95 % family-wise): **not separated**
- **Claim** (the paper's): (`c->d`) SK transfers. Tested as: each of `SK − linear, 1 shot a class` better. **Verdict: not shown**, from `SK − linear, 1 shot a class` (not separated).
"""


def test_each_claim_quotes_the_rows_of_its_own_setting_when_settings_share_row_names(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "transfer.md").write_text(TWO_SETTINGS)
    block = rr.block(results)
    first, second = block.split("- **Claim**")[1:]
    assert "row (`a->b`) `SK − linear, 1 shot a class`: +15.89" in first and "+3.57" not in first
    assert "row (`c->d`) `SK − linear, 1 shot a class`: +3.57" in second and "+15.89" not in second
    text = f"# SK\n\n{rr.RESULTS_HEADING} (CPU)\n\nNot shown.\n\n{block}\n\n## Tests\n"
    assert rr.check(text, results) == []
    swapped = text.replace("+15.89 [+8.00, +23.79]", "X").replace("+3.57 [−4.31, +11.45]", "+15.89 [+8.00, +23.79]")
    assert rr.check(swapped.replace("X", "+3.57 [−4.31, +11.45]"), results)  # the two settings' rows exchanged
