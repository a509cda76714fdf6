"""Tasks (model + loss + metric) and the training loop of the demo.

Timing covers the training steps only (forward, backward, curvature passes, optimiser step), with a
device synchronisation on each side on CUDA; evaluation runs under ``torch.no_grad`` outside the
timed region.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models
from .data import Digits


# ---------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """What one model is trained on and how it is scored."""
    name: str                     # "autoencoder" | "cnn"
    title: str
    likelihood: str               # for K-FAC's curvature passes
    loss_name: str
    metric_name: str              # test metric shown in the table
    metric_higher_is_better: bool
    batch_size: int               # 0: full batch
    steps: int                    # default number of optimiser steps
    thresholds: Sequence[float]   # train-loss levels the table reports steps/seconds to reach

    def inputs(self, x: torch.Tensor, data: Digits) -> torch.Tensor:
        if self.name == "cnn":            # standardised inputs for the classifier
            return (x - data.mean) / data.std
        return x                          # the autoencoder sees (and reconstructs) intensities

    def loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "autoencoder":
            # Bernoulli negative log-likelihood of the 64 pixel intensities, summed over pixels
            # (one example's loss), averaged over the batch: nats per image
            return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / out.shape[0]
        return F.cross_entropy(out, y)

    def metric(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.name == "autoencoder":
            # squared reconstruction error per image (summed over the 64 pixels, mean over images)
            return float(((torch.sigmoid(out) - x) ** 2).sum(1).mean())
        return float((out.argmax(1) == y).float().mean())


TASKS: Dict[str, Task] = {
    "autoencoder": Task(
        name="autoencoder", title="deep autoencoder 64-256-128-64-16-64-128-256-64 (tanh)",
        likelihood="bernoulli", loss_name="Bernoulli NLL (nats/image)",
        metric_name="test recon. error", metric_higher_is_better=False,
        batch_size=0, steps=200, thresholds=(22.0, 18.0, 15.0)),
    "cnn": Task(
        name="cnn", title="CNN classifier 1x8x8 -> conv16 -> conv32/2 -> 64 -> 10 (ReLU)",
        likelihood="categorical", loss_name="cross-entropy (nats)",
        metric_name="test accuracy", metric_higher_is_better=True,
        batch_size=256, steps=200, thresholds=(0.3, 0.1, 0.01)),
}


# ----------------------------------------------------------------------------------- optimisers
@dataclass(frozen=True)
class OptimizerSpec:
    """One optimiser and its settings (``kwargs`` go to the constructor besides ``lr``)."""
    name: str                         # "kfac" | "adam" | "sgd" | "soap" | "shampoo" | "muon"
    lr: float
    kwargs: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return {"kfac": "K-FAC", "adam": "Adam", "sgd": "SGD+momentum", "soap": "SOAP",
                "shampoo": "Shampoo", "muon": "Muon"}[self.name]

    def describe(self) -> str:
        parts = [f"lr={self.lr:g}"] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def with_(self, **changes) -> "OptimizerSpec":
        lr = changes.pop("lr", self.lr)
        return OptimizerSpec(self.name, lr, {**self.kwargs, **changes})


def make_optimizer(spec: OptimizerSpec, model: nn.Module, task: Task, seed: int):
    if spec.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, **spec.kwargs)
    if spec.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, **spec.kwargs)
    if spec.name in ("soap", "shampoo"):
        from ..optim import SOAP, Shampoo
        cls = SOAP if spec.name == "soap" else Shampoo
        return cls(model.parameters(), lr=spec.lr, **spec.kwargs)
    if spec.name == "muon":
        return make_muon(model, spec.lr, **spec.kwargs)
    if spec.name == "kfac":
        from ..optimizer import KFAC
        kw = dict(spec.kwargs)
        if kw.get("curvature", "empirical") != "empirical":
            kw.setdefault("likelihood", task.likelihood)
        return KFAC(model, lr=spec.lr, seed=seed, **kw)
    raise ValueError(f"unknown optimiser {spec.name!r}")


MUON_EXTRA_KEYS = ("adamw_lr", "adamw_weight_decay")    # the demo's settings of Muon's AdamW group


def make_muon(model: nn.Module, lr: float, adamw_lr: float, adamw_weight_decay: float = 0.0,
              **muon_kwargs):
    """kfac_kernels.optim.Muon on the hidden Linear weights, its AdamW group on the rest."""
    from ..optim import Muon, muon_param_groups
    groups = muon_param_groups(model, adamw_lr=adamw_lr, weight_decay=adamw_weight_decay)
    return Muon(groups, lr=lr, **muon_kwargs)


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One (model, optimiser) training run: the curves and the summary numbers."""
    task: str
    optimizer: str
    label: str
    settings: str
    steps: List[int] = field(default_factory=list)          # eval points (updates done)
    seconds: List[float] = field(default_factory=list)      # training time at each eval point
    cpu_seconds: float = 0.0                                # process CPU time of the training
    train_loss: List[float] = field(default_factory=list)   # full training-set loss
    test_loss: List[float] = field(default_factory=list)
    test_metric: List[float] = field(default_factory=list)
    diverged_at: Optional[int] = None                       # first eval with a non-finite loss

    @property
    def final(self) -> dict:
        return dict(train_loss=self.train_loss[-1], test_loss=self.test_loss[-1],
                    test_metric=self.test_metric[-1], steps=self.steps[-1],
                    seconds=self.seconds[-1])

    def reach(self, threshold: float):
        """(steps, seconds) at the first eval point with train loss <= threshold, or None."""
        for s, t, loss in zip(self.steps, self.seconds, self.train_loss):
            if loss <= threshold:
                return s, t
        return None

    def ms_per_step(self) -> float:
        return 1e3 * self.seconds[-1] / max(self.steps[-1], 1)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["final"] = self.final
        d["ms_per_step"] = self.ms_per_step()
        return d


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> Optional[torch.Tensor]:
    """[steps, batch_size] example indices: epochs of a seeded permutation (None: full batch).

    Drawn once and shared by every optimiser, so all of them see the same data in the same order.
    """
    if batch_size <= 0 or batch_size >= n:
        return None
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size                      # drop the ragged tail of each epoch
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n, generator=gen)[:per_epoch * batch_size].view(per_epoch, batch_size)
            for _ in range(epochs)]
    return torch.cat(rows)[:steps]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, data: Digits):
    model.eval()
    out = model(task.inputs(data.x_train, data))
    train = float(task.loss(out, data.x_train, data.y_train))
    out = model(task.inputs(data.x_test, data))
    test = float(task.loss(out, data.x_test, data.y_test))
    metric = task.metric(out, data.x_test, data.y_test)
    model.train()
    return train, test, metric


def train(task: Task, spec: OptimizerSpec, init_state: dict, data: Digits, steps: int,
          seed: int, device: torch.device, eval_every: int = 1,
          batches: Optional[torch.Tensor] = None,
          progress: Optional[Callable[[int, float], None]] = None) -> Run:
    """Train a fresh copy of ``task``'s model from ``init_state`` with ``spec`` for ``steps``."""
    model = models.build(task.name, seed).to(device)
    model.load_state_dict(init_state)
    opt = make_optimizer(spec, model, task, seed)
    is_kfac = spec.name == "kfac"
    run = Run(task.name, spec.name, spec.label, spec.describe())
    x_all, y_all = data.x_train, data.y_train
    if batches is not None:
        batches = batches.to(device)
    elapsed = 0.0

    def record(step: int) -> bool:
        train_loss, test_loss, metric = evaluate(model, task, data)
        run.steps.append(step)
        run.seconds.append(elapsed)
        run.train_loss.append(train_loss)
        run.test_loss.append(test_loss)
        run.test_metric.append(metric)
        if progress is not None:
            progress(step, train_loss)
        if not math.isfinite(train_loss):
            run.diverged_at = step
            return False
        return True

    record(0)
    try:
        for step in range(1, steps + 1):
            if batches is None:
                x, y = x_all, y_all
            else:
                idx = batches[step - 1]
                x, y = x_all[idx], y_all[idx]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(task.inputs(x, data))
            loss = task.loss(out, x, y)
            opt.zero_grad(set_to_none=True)
            if is_kfac:
                opt.backward(loss, out)
            else:
                loss.backward()
            opt.step()
            _sync(device)
            elapsed += time.perf_counter() - t0
            run.cpu_seconds += time.process_time() - c0
            if (step % eval_every == 0 or step == steps) and not record(step):
                break
    finally:
        if is_kfac:
            opt.close()
    return run
