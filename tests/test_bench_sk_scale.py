"""scripts/bench_sk_scale.py at tiny sizes: its synthetic bank draws any row range alike, and its report
states the targets from the numbers it measured."""
import re

import pytest
import torch

from scripts import bench_sk_scale as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_the_same_whatever_the_range():
    gen = bench.Synthetic(d=12, clusters=20, classes=5)
    x, labels = gen.rows(0, 150_000)
    part, part_labels = gen.rows(70_000, 140_000)       # across a block boundary (65,536 rows a block)
    assert torch.equal(part, x[70_000:140_000]) and torch.equal(part_labels, labels[70_000:140_000])
    queries, _ = gen.rows(0, 100, stream=1)
    assert not torch.equal(queries, x[:100])             # the queries are their own draw
    nearest_centre = torch.cdist(x[:2000], gen.tables["centres"]).argmin(1)
    flipped = (labels[:2000] != gen.tables["class_of"][nearest_centre]).float()
    assert 0.02 < float(flipped.mean()) < 0.2             # label noise 0.1 (a flip may draw the same class)
    with pytest.raises(ValueError, match="latent"):
        bench.Synthetic(d=6, latent=8)


def test_report_of_a_tiny_run(tmp_path):
    out = tmp_path / "scale.md"
    bench.main(["--n", "20000", "--queries", "120", "--hnsw-n", "5000", "--default-queries", "10", "--threads", "1",
                "--sections", "2,3", "--nprobe", "1,4", "--ef", "16,64", "--out", str(out)])
    text = out.read_text()
    assert "## Targets" in text and "## 2. IVF" in text and "## 3. HNSW" in text and "## 4." not in text
    row = re.search(r"\| 4 \| ([\d.e-]+) \| ([\d.]+)x \|", text)
    exact = re.search(r"\| ([\d.e-]+) \| [\d.e-]+ \| [\d.e-]+ \| ([\d.]+) \|", text.split("## 1.")[1])
    assert row and exact
    assert float(row.group(2)) == pytest.approx(float(exact.group(1)) / float(row.group(1)), rel=0.06)
    assert "Commit:" in text and "Load average" in text and "--n 20000" in text


@pytest.mark.slow
def test_quick_run_of_every_section(tmp_path):
    out = tmp_path / "quick.md"
    bench.main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert all(f"## {s}." in text for s in range(1, 6))
    assert "| 2-process sharded SK = single process to 1e-6 | max difference 0 | yes |" in text
