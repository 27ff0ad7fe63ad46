#!/usr/bin/env python
"""Data-parallel training with an SK head, its checkpoint, and SK over a support sharded across the ranks.

    torchrun --nproc-per-node 2 examples/ddp_sk_head.py        # 2 CPU processes (gloo)
    python examples/ddp_sk_head.py                              # one process: the same code, a group of 1
    torchrun --nproc-per-node 8 examples/ddp_sk_head.py --device cuda   # NCCL, one GPU a process

1. Train: an MLP encoder and an ``sk.SKClassifier`` head inside ``DistributedDataParallel``. The head's
   support (200 representations and their targets) is learned: both are ordinary parameters of the DDP
   module, so every rank keeps a replica and DDP averages their gradients like the encoder's. Each rank
   trains on its slice of every batch.
2. Checkpoint: rank 0 saves ``model.module.state_dict()``; every rank restores it into a freshly built model
   (the head's k, kernel and options come back from the state) and checks that it answers the same.
3. Evaluate with a sharded support: every rank encodes its shard of the training set and keeps it; an
   ``sk.ShardedSupport`` of the shards classifies each rank's test queries over the whole training set, as
   ``sk.sparse_krr`` would over the concatenated features in one process, without any rank holding them all.
   It runs on a process group of its own, apart from DDP's.

The data are synthetic (10 classes, inputs of 20 dimensions through a fixed random nonlinearity), so the
example needs nothing but torch and sk.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sk

CLASSES, INPUTS, FEATURES, SUPPORT = 10, 20, 16, 200


def start(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes, or make a group of one for a plain ``python`` run."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n labelled inputs: Gaussian classes pushed through a fixed random two-layer map (seed 0)."""
    fixed = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(CLASSES, INPUTS, generator=fixed)
    mix = torch.randn(INPUTS, INPUTS, generator=fixed) / INPUTS ** 0.5
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    raw = centres[labels] + 1.5 * torch.randn(n, INPUTS, generator=g)
    return torch.tanh(raw @ mix) + 0.1 * raw, labels


def build_model(support_inputs: torch.Tensor, support_labels: torch.Tensor) -> nn.Sequential:
    """Encoder + SK head whose learned support starts at the encoder's features of ``support_inputs``."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(INPUTS, 64), nn.GELU(), nn.Linear(64, FEATURES))
    with torch.no_grad():
        features = encoder(support_inputs)
    head = sk.SKClassifier(features, support_labels, num_classes=CLASSES, k=16, lengthscale="auto", ridge=1e-2,
                           learn_representations=True, learn_targets=True)
    return nn.Sequential(encoder, head)


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def train(model: DistributedDataParallel, inputs, labels, args, rank: int, world: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    device = inputs.device
    for epoch in range(args.epochs):
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(epoch)).to(device)
        losses = []
        for start in range(0, len(inputs), args.batch):
            batch = order[start:start + args.batch][rank::world]      # this rank's slice of the batch
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()                                              # DDP averages every gradient
            opt.step()
            losses.append(loss.item())
        loss = mean_over_ranks(sum(losses) / len(losses), device)
        if rank == 0:
            print(f"epoch {epoch + 1}: training loss {loss:.3f}", flush=True)


def check_checkpoint(model: nn.Module, path: Path, support, probe: torch.Tensor, rank: int) -> None:
    if rank == 0:
        torch.save(model.state_dict(), path)
    dist.barrier()
    restored = build_model(*support).to(probe.device)                 # a fresh model: other initial weights
    restored.load_state_dict(torch.load(path, map_location=probe.device))
    with torch.no_grad():
        gap = float((restored(probe) - model(probe)).abs().max())
    if rank == 0:
        print(f"checkpoint {path.name}: the restored model answers like the trained one (max difference {gap:.3g})")
    assert gap == 0.0


@torch.no_grad()
def sharded_accuracy(model: nn.Module, train_data, test_data, rank: int, world: int, group) -> float:
    """Test accuracy of SK over the encoded training set, held as one shard per rank."""
    encoder, head = model[0], model[1]
    (x_train, y_train), (x_test, y_test) = train_data, test_data
    shard = slice(rank * len(x_train) // world, (rank + 1) * len(x_train) // world)
    support = sk.ShardedSupport(encoder(x_train[shard]), y_train[shard], num_classes=CLASSES, group=group)
    lengthscale = support.auto_lengthscale(k=32)                      # sk.auto_lengthscale of the whole set
    mine = slice(rank * len(x_test) // world, (rank + 1) * len(x_test) // world)
    scores = support.sparse_krr(encoder(x_test[mine]), k=32, lengthscale=lengthscale, ridge=float(head.ridge))
    correct = (scores.argmax(1) == y_test[mine]).double().sum()
    dist.all_reduce(correct, group=group)
    return float(correct) / len(x_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="global batch, split over the ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train", type=int, default=4000, help="training inputs")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="where rank 0 saves, on a file system every rank reads (default: a temporary directory)")
    args = parser.parse_args()
    rank, world = start(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    x_train, y_train = (t.to(device) for t in make_data(args.train, seed=1))
    x_test, y_test = (t.to(device) for t in make_data(1000, seed=2))
    support = (x_train[:SUPPORT], y_train[:SUPPORT])
    model = DistributedDataParallel(build_model(*support).to(device))
    if rank == 0:
        print(f"{world} process(es), {dist.get_backend()}; SK head: {model.module[1]}", flush=True)
    train(model, x_train, y_train, args, rank, world)
    with tempfile.TemporaryDirectory() as tmp:
        path = [str(args.checkpoint or Path(tmp) / "ddp_sk_head.pt")]
        dist.broadcast_object_list(path, src=0)       # rank 0's path: every rank reads the file rank 0 wrote
        check_checkpoint(model.module, Path(path[0]), support, x_test[:64], rank)
        dist.barrier()                                 # rank 0's temporary directory outlives the reads
    sk_group = dist.new_group()              # sk.distributed's collectives apart from DDP's
    accuracy = sharded_accuracy(model.module, (x_train, y_train), (x_test, y_test), rank, world, sk_group)
    if rank == 0:
        print(f"test accuracy of SK over the {args.train} encoded training inputs, sharded over {world} rank(s): "
              f"{100 * accuracy:.1f}%")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
