"""`PROFILE=paper` runs the paper's setting; `make paper-tables` stops at once, offline, when data or
weights are missing; `make test-cuda` and `make test-slow` do what they say."""
from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / ".venv" / ".installed"
VIT_S16 = "vit_small_patch16_224.augreg_in21k_ft_in1k"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args, env=None, timeout=120):
    # -o: never rebuild the virtual environment from inside a test, even when pyproject.toml is newer
    cmd = ["make", "--no-print-directory", "-o", str(STAMP.relative_to(ROOT)), "-o", "data", *args]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MAKEFLAGS", None)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)


def run_lines(output: str) -> list[list[str]]:
    """The Hydra overrides of every `experiments/run.py -m ...` line of a `make -n` output."""
    out = []
    for line in output.replace("\\\n", " ").splitlines():
        if "experiments/run.py" not in line:
            continue
        words = shlex.split(line)
        if "experiments/run.py" in words:
            rest = words[words.index("experiments/run.py") + 1:]
            out.append([w for w in rest if w != "-m"])
    return out


def compose_all(overrides: list[str]):
    """Compose the config of every job of one sweep line (each comma-separated choice, seeds aside)."""
    from hydra import compose, initialize_config_dir

    fixed, sweeps = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "seed" or key.startswith("hydra"):
            continue
        if "," in value and not value.startswith("["):
            sweeps.append([f"{key}={v}" for v in value.split(",")])
        else:
            fixed.append(o)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return [compose(config_name="config", overrides=fixed + list(choice))
                for choice in itertools.product(*sweeps)]


def test_paper_cnn_readout_runs_cifar10_with_resnet18():
    out = make("-n", "PROFILE=paper", "table-cnn-readout")
    assert out.returncode == 0, out.stderr
    (line,) = run_lines(out.stdout)
    assert "data=cifar10" in line and "backbone=resnet18" in line and "profile=paper" in line
    (cfg,) = compose_all(line)
    assert (cfg.data.name, cfg.backbone.name, cfg.profile, cfg.exp.name) == ("cifar10", "resnet18", "paper", "cnn_readout")


def test_quick_profile_keeps_the_offline_defaults():
    out = make("-n", "table-cnn-readout", "table-vit-probe", "table-transfer")
    assert out.returncode == 0, out.stderr
    lines = run_lines(out.stdout)
    assert len(lines) == 3 and all("profile=quick" in line for line in lines)
    assert not any(w.startswith(("data=", "backbone=")) for line in lines for w in line)


def test_paper_vit_probe_and_transfer_compose_to_the_papers_setting():
    out = make("-n", "PROFILE=paper", "table-vit-probe", "table-transfer")
    assert out.returncode == 0, out.stderr
    jobs = [cfg for line in run_lines(out.stdout) for cfg in compose_all(line)]
    assert all(cfg.profile == "paper" for cfg in jobs)
    vit = [cfg for cfg in jobs if cfg.exp.name == "vit_probe"]
    assert sorted(cfg.data.name for cfg in vit) == ["cifar10", "cifar100"]
    assert all((cfg.backbone.name, cfg.backbone.model, cfg.backbone.img_size) == ("timm", VIT_S16, 224) for cfg in vit)
    transfer = [cfg for cfg in jobs if cfg.exp.name == "transfer"]
    pairs = sorted((cfg.backbone.name, cfg.data.name) for cfg in transfer)
    assert pairs == sorted(itertools.product(["efficientnet_lite0", "timm"], ["cifar10", "cifar100", "fashion_mnist"]))
    assert all(cfg.backbone.img_size == 224 for cfg in transfer)  # native resolution of both backbones
    assert all(cfg.backbone.model == VIT_S16 for cfg in transfer if cfg.backbone.name == "timm")
    assert sum(bool(cfg.exp.within) for cfg in transfer) == 1  # the within-data-set part runs once


def test_vit_checkpoint_reaches_the_runs_and_the_check():
    out = make("-n", "paper-tables", "VIT_CHECKPOINT=/weights/vit_s16.safetensors")
    assert out.returncode == 0, out.stderr
    assert "scripts/paper_data.py --check --vit-checkpoint /weights/vit_s16.safetensors" in out.stdout
    vit_lines = [line for line in run_lines(out.stdout) if "backbone=timm" in line]
    assert vit_lines and all("backbone.checkpoint_path=/weights/vit_s16.safetensors" in line for line in vit_lines)


def _offline_env(tmp_path) -> dict:
    return {"SK_DATA": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub"),
            "HF_HUB_OFFLINE": "1"}


def test_paper_check_fails_fast_offline_and_says_what_to_do(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_data.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **_offline_env(tmp_path)}, timeout=60)
    assert out.returncode == 1 and time.perf_counter() - start < 30
    for what in ("CIFAR-10:", "CIFAR-100:", f"timm/{VIT_S16}", "make paper-data", "VIT_CHECKPOINT=",
                 str(tmp_path / "data"), str(tmp_path / "hub")):
        assert what in out.stderr, (what, out.stderr)


def _fake_paper_data(tmp_path):
    data = tmp_path / "data"
    for folder, files in [("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
                          ("cifar-100-python", ["train", "test", "meta"]),
                          ("fashion-mnist", [f"{s}-ubyte.gz" for s in ("train-images-idx3", "train-labels-idx1",
                                                                       "t10k-images-idx3", "t10k-labels-idx1")])]:
        (data / folder).mkdir(parents=True)
        for f in files:
            (data / folder / f).write_bytes(b"x")
    repo = tmp_path / "hub" / f"models--timm--{VIT_S16}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")


def test_paper_check_passes_when_everything_is_there(tmp_path):
    _fake_paper_data(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_data.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **_offline_env(tmp_path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    (tmp_path / "data" / "cifar-100-python" / "meta").unlink()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_data.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **_offline_env(tmp_path)}, timeout=60)
    assert out.returncode == 1 and "CIFAR-100:" in out.stderr and "lacks meta" in out.stderr
    assert "CIFAR-10:" not in out.stderr and "ViT-S/16" not in out.stderr.split("Get them")[0]


def test_make_paper_tables_stops_before_any_run(tmp_path):
    start = time.perf_counter()
    # RUN and LOCK replaced: should the check ever pass here, nothing heavy starts
    out = make("paper-tables", "RUN=echo WOULD-RUN", "LOCK=", env=_offline_env(tmp_path))
    assert out.returncode != 0 and time.perf_counter() - start < 60
    assert "WOULD-RUN" not in out.stdout + out.stderr
    assert "CIFAR-10:" in out.stderr and "make paper-data" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_make_test_cuda_without_cuda_says_so():
    out = make("test-cuda")
    assert out.returncode == 0 and "no CUDA device here" in out.stdout


def test_make_test_slow_has_tests_to_run():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider",
                          "--continue-on-collection-errors"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # exit 5 would mean that nothing is marked slow, and `make test-slow` would fail
    assert out.returncode != 5 and "test_tables_end_to_end.py::" in out.stdout, out.stdout[-2000:]
