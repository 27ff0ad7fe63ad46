"""scripts/sk_equivalence.py: another commit's sk/ is imported beside this one and compared call by call."""
import torch

from scripts import sk_equivalence as eq


def test_this_commit_against_itself_is_the_same(capsys):
    assert eq.main(["--against", "HEAD", "--quick"]) == 0
    assert "0 differ" in capsys.readouterr().out


def test_a_difference_is_reported_and_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(eq, "sweep", lambda other, quick: (3, ["M=1 N=40 ..."]))
    assert eq.main(["--against", "HEAD", "--quick"]) == 1
    assert "differs: M=1 N=40" in capsys.readouterr().out


def test_same_compares_bits_gradients_and_error_texts():
    a = torch.tensor([1.0, 2.0])
    assert eq.same((a, None), (a.clone(), None))
    assert not eq.same((a, None), (a + 1e-7, None))
    assert not eq.same((a, a), (a, None)) and not eq.same((a, a), (a, a * 2))
    assert eq.same("ValueError: x", "ValueError: x") and not eq.same("ValueError: x", (a, None))
