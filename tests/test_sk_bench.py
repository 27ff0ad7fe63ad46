"""Smoke test of scripts/bench_sk.py --quick: it runs end to end and writes its report atomically."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_report(tmp_path):
    out = tmp_path / "bench.md"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_sk.py"), "--quick", "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# sk benchmark") and "Quick smoke run" in text
    assert "Command: `" in text and "torch threads 1" in text
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert section in text
    assert "SK / k-NN vote time ratio" in text
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]     # no temporary file left behind
