"""Training and feature extraction for image classifiers: a backbone (images -> features) and a head.

Shared by the experiments that train or read out backbones (cnn_readout, transfer). Images stay uint8
(N, C, H, W) until a batch is drawn; each batch is moved to the device, scaled to [0, 1], normalised
with ``mean_std``, channel-replicated (``channels``) and resized (``size``) there, so CPU and GPU runs
share one code path.

- ``train_classifier(backbone, head, x, y, ...)``: minibatch training of head and backbone together
  with cross-entropy by default; returns a per-epoch history with the training seconds (evaluation
  inside ``on_epoch_end`` is not counted). A head alone is trained on fixed features with
  ``nn.Identity()`` as the backbone and the features as ``x``. The head may be anything that maps
  features to outputs: a linear layer, an MLP, or an SK head through ``head_forward`` (which also sees
  the labels, so that a head can take its support set from the batch).
- ``extract_features(backbone, x, ...)``: features of a frozen backbone, in eval mode, without grad.
- ``predict(backbone, head, x, ...)``: predicted labels of a head on a backbone's features.
- ``crop_flip(pad)``: the usual CIFAR augmentation (random crop after zero padding, horizontal flip).
- ``count_params(module)``: number of trainable parameters.

Example::

    hist = train_classifier(backbone, nn.Linear(backbone.feature_dim, 10), x_train, y_train, epochs=5,
                            batch_size=128, lr=1e-3, device=device, mean_std=data.mean_std)
    feats = extract_features(backbone, x_test, batch_size=512, device=device, mean_std=data.mean_std)
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.core.data import to_float
from experiments.core.progress import progress as default_progress

Progress = Callable[..., Iterable]
# head_forward(head, features, labels) -> (outputs, targets): what the loss compares
HeadForward = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def count_params(module: nn.Module | None, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module; 0 for None."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def to_input(x: Tensor, device: torch.device | str, mean_std=None, channels: int | None = None,
             size: int | None = None) -> Tensor:
    """uint8 (B, C, H, W) -> float on ``device``: scaled to [0, 1], normalised, channel-replicated, resized.

    Floating-point input is taken as already prepared (e.g. cached features): only moved to the device.
    """
    if x.is_floating_point():
        return x.to(device, non_blocking=True)
    return to_float(x.to(device, non_blocking=True), mean_std, channels=channels, size=size)


def crop_flip(pad: int = 4, flip: bool = True) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """Random crop of the original size after zero padding by ``pad``, then a random horizontal flip."""

    def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, c, h, w = x.shape
        xp = F.pad(x, (pad, pad, pad, pad))
        di = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dj = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (di[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dj[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        out = xp[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        if flip:
            mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            out = torch.where(mirror[:, None, None, None], out.flip(3), out)
        return out

    return augment


def _autocast(device: torch.device, amp: bool):
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def extract_features(backbone: nn.Module, x: Tensor, *, batch_size: int, device, mean_std=None,
                     channels: int | None = None, size: int | None = None, amp: bool = False,
                     progress: Progress | None = None, desc: str = "features") -> Tensor:
    """Features (N, feature_dim) of uint8 images ``x`` (N, C, H, W), float32 on the CPU.

    The backbone runs in eval mode (batch-norm statistics fixed) and is put back in its previous mode.
    """
    progress = progress or default_progress
    backbone.to(device)
    out = []
    starts = range(0, x.shape[0], batch_size)
    with _eval_mode(backbone):
        for s in progress(starts, desc=desc, total=len(starts)):
            xb = to_input(x[s:s + batch_size], device, mean_std, channels, size)
            with _autocast(device, amp):
                f = backbone(xb)
            out.append(f.float().cpu())
    if not out:
        return torch.zeros(0, getattr(backbone, "feature_dim", 0))
    return torch.cat(out)


@torch.no_grad()
def predict(backbone: nn.Module, head: nn.Module, x: Tensor, *, batch_size: int, device, mean_std=None,
            channels: int | None = None, size: int | None = None, amp: bool = False,
            progress: Progress | None = None) -> Tensor:
    """Predicted labels (N,) of ``head(backbone(x))`` in eval mode, on the CPU."""
    feats = extract_features(backbone, x, batch_size=batch_size, device=device, mean_std=mean_std,
                             channels=channels, size=size, amp=amp, progress=progress, desc="predict")
    head.to(device)
    with _eval_mode(head):
        preds = [head(feats[s:s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(feats), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    """``adam`` | ``adamw`` | ``sgd`` (Nesterov momentum)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose adam, adamw or sgd")


def train_classifier(backbone: nn.Module, head: nn.Module, x_train: Tensor, y_train: Tensor, *, epochs: int,
                     batch_size: int, lr: float, device, mean_std=None, augment=None,
                     optimizer: str = "adam", weight_decay: float = 0.0,
                     momentum: float = 0.9, schedule: str = "cosine", channels: int | None = None,
                     size: int | None = None, amp: bool = False, head_forward: HeadForward | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, drop_last: bool = True,
                     generator: torch.Generator | None = None, progress: Progress | None = None,
                     on_epoch_end: Callable[[int, dict], dict | None] | None = None,
                     desc: str = "train") -> list[dict[str, Any]]:
    """Train ``head(backbone(x))`` on uint8 images ``x_train`` (N, C, H, W) with labels ``y_train`` (N,).

    ``x_train`` may also be a float tensor used as it is, e.g. cached features with ``nn.Identity()`` as
    the backbone (a head retrained on frozen features without recomputing them).

    Args:
        backbone: images -> features (N, d). head: features -> outputs (N, C).
        epochs, batch_size, lr: the budget; ``schedule`` is ``cosine`` (to 0 over all steps) or ``constant``.
        device: where to train; mean_std, channels, size: preprocessing (see ``to_input``).
        augment: ``augment(x_float, generator) -> x_float`` on each training batch (e.g. ``crop_flip()``).
        optimizer, weight_decay, momentum: see ``make_optimizer``; amp: bfloat16 autocast of the
            backbone on CUDA (the head always runs in float32).
        head_forward: ``head_forward(head, features, labels) -> (outputs, targets)`` replaces
            ``(head(features), labels)``, e.g. an SK head whose support is part of the batch.
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy.
        generator: seeds the batch order and augmentation (CPU generator).
        on_epoch_end: ``on_epoch_end(epoch, entry) -> dict | None`` after each epoch (1-based), e.g. a
            test evaluation; its time is not counted and the dict it returns is merged into the entry.

    Returns:
        history: one dict per epoch with ``epoch``, ``loss`` (mean over batches), ``train_acc`` (argmax of
        outputs against targets), ``epoch_s`` and ``train_s`` (cumulative seconds of training). The
        modules are left in the train/eval mode they came in.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if len(x_train) != len(y_train):
        raise ValueError(f"x_train has {len(x_train)} images but y_train {len(y_train)} labels")
    progress = progress or default_progress
    generator = generator or torch.Generator().manual_seed(0)
    loss_fn = loss_fn or F.cross_entropy
    head_forward = head_forward or (lambda h, f, y: (h(f), y))
    backbone.to(device)
    head.to(device)
    y_dev = y_train.to(device)

    modes = (backbone.training, head.training)
    params = [p for p in [*head.parameters(), *backbone.parameters()] if p.requires_grad]
    n = len(x_train)
    steps_per_epoch = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    opt = make_optimizer(params, optimizer, lr, weight_decay, momentum) if params else None
    sched = None
    if opt is not None and schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    elif schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}: choose cosine or constant")

    history: list[dict[str, Any]] = []
    train_s = 0.0
    x_dev = x_train.to(device)
    try:
        for epoch in range(1, epochs + 1):
            _sync(device)
            t0 = time.perf_counter()
            head.train()
            backbone.train()
            perm = torch.randperm(n, generator=generator).to(device)
            total_loss, correct, seen, batches = 0.0, 0, 0, 0
            for b in progress(range(steps_per_epoch), desc=f"{desc} epoch {epoch}/{epochs}", total=steps_per_epoch):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                yb = y_dev[idx]
                xb = to_input(x_dev[idx], device, mean_std, channels, size)
                if augment is not None:
                    xb = augment(xb, generator)
                with _autocast(device, amp):
                    feats = backbone(xb)
                feats = feats.float()  # the head runs in float32
                outputs, targets = head_forward(head, feats, yb)
                loss = loss_fn(outputs, targets)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                total_loss += float(loss.detach())
                batches += 1
                if targets.dim() == 1:
                    correct += int((outputs.detach().argmax(1) == targets).sum())
                    seen += len(targets)
            _sync(device)
            epoch_s = time.perf_counter() - t0
            train_s += epoch_s
            entry = {"epoch": epoch, "loss": total_loss / max(batches, 1),
                     "train_acc": correct / seen if seen else float("nan"), "epoch_s": epoch_s, "train_s": train_s}
            if on_epoch_end is not None:
                extra = on_epoch_end(epoch, dict(entry))
                if extra:
                    entry.update(extra)
            history.append(entry)
    finally:
        backbone.train(modes[0])
        head.train(modes[1])
    return history
