import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SK_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def run_cli(args: list[str], tmp_path: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run experiments/run.py in a subprocess with results, cache and Hydra outputs under tmp_path."""
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *args,
           f"paths.results={tmp_path}/results", f"paths.cache={tmp_path}/cache",
           f"hydra.run.dir={tmp_path}/outputs/run", f"hydra.sweep.dir={tmp_path}/multirun"]
    full_env = {**os.environ, "SK_NO_PROGRESS": "1", "WANDB_SILENT": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset that variable
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops: on a shared 2-core machine a second OpenMP thread
    only waits for a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(list(args), tmp_path, **kw)
    return _run
