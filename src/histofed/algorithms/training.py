"""The one trainer: every optimisation loop in histofed runs through :func:`optimise`.

Local training, DP-SGD (record-level FedDP), two-model distillation (a private teacher and a
shared student) and server-side optimisation of synthetic tensors differ only in *what one step
computes* and *which tensors the optimisers move*. Methods supply the step; this module owns the
loop, its NaN check, its seeded randomness and its log::

    optimise(steps, step_fn, optimizers, batches=..., seed=..., where="client 'a', round 3")

``step_fn(batch)`` returns the loss tensor to minimise, or a dict of named loss tensors (their
sum is minimised; each is logged). Randomness inside a step (dropout, augmentation drawn from
torch's default generator) is seeded from ``seed`` inside a forked RNG, so the caller's global
RNG is left as it was.

:class:`Trainer` is the per-job object behind ``ClientContext.trainer``: ``train(ctx, model,
...)`` is plain local training; a wrapper (FedDP's record level) swaps in a subclass that trains
with DP-SGD, and the wrapped method never knows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from histofed.algorithms.base import ClientContext, ClientTrainingError

if TYPE_CHECKING:
    from histofed.config import TrainConfig

StepFn = Callable[[Any], "torch.Tensor | dict[str, torch.Tensor]"]
ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""extra_loss(model, inputs, target, logits) -> a term added to the task loss (FedProx, L_sc)."""

_PASS_PRIME = 104729  # seed offset between passes over a dataset


# ---- batches -----------------------------------------------------------------------------------
def reseed(dataset: Dataset, seed: int) -> None:
    """Fix the random crops/augmentations of a dataset (and of ConcatDataset parts)."""
    if isinstance(dataset, ConcatDataset):
        for i, part in enumerate(dataset.datasets):
            reseed(part, seed + 7919 * i)
    elif hasattr(dataset, "reseed"):
        dataset.reseed(seed)


def passes(dataset: Dataset, seed: int, loader: Callable[[int], Any]) -> Iterator:
    """Items of ``loader(epoch)`` forever; before each pass the dataset's crops and
    augmentations are reseeded from (seed, pass), so a run is reproducible."""
    epoch = 0
    while True:
        reseed(dataset, seed + _PASS_PRIME * epoch)
        yield from loader(epoch)
        epoch += 1


def shuffled_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator:
    """Shuffled batches forever, reproducible from ``seed`` (new shuffle + crops each pass)."""
    drop_last = len(dataset) >= batch_size

    def loader(epoch: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed + epoch)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                          drop_last=drop_last, num_workers=0)

    return passes(dataset, seed, loader)


# ---- the loop ----------------------------------------------------------------------------------
def make_optimizer(params: nn.Module | Sequence[torch.Tensor], cfg: TrainConfig,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """The [train] optimiser over a model's trainable parameters (or given tensors)."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def optimise(steps: int, step_fn: StepFn, optimizers: Sequence[torch.optim.Optimizer], *,
             batches: Iterator | None = None, seed: int | None = None, where: str = "training",
             modules: Sequence[nn.Module] = ()) -> dict[str, float]:
    """Run ``steps`` optimiser steps; returns the mean of each loss, ``steps`` and ``seconds``.

    Args:
        steps: number of steps (each: zero grads, one backward of the summed loss, step all).
        step_fn: ``batch -> loss`` (a scalar tensor or a dict of named scalar tensors).
        optimizers: every optimiser stepped each step (e.g. teacher's and student's).
        batches: where batches come from (None: ``step_fn`` receives the step index).
        seed: seeds torch's default generator for the loop, in a forked RNG (None: leave it).
        where: who trains, for error messages ("client 'a', round 3").
        modules: put in train mode first (e.g. the models being trained).

    Raises:
        ClientTrainingError: a loss became NaN or inf; names ``where``, the step and the loss.
    """
    for module in modules:
        module.train()
    sums: dict[str, float] = {}
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for step in range(1, steps + 1):
            batch = next(batches) if batches is not None else step
            out = step_fn(batch)
            parts = out if isinstance(out, dict) else {"loss": out}
            loss = sum(parts.values()) if len(parts) > 1 else next(iter(parts.values()))
            if not torch.isfinite(loss):
                bad = ", ".join(f"{k} = {v.item():.4g}" for k, v in parts.items())
                raise ClientTrainingError(
                    f"{where}, step {step}: loss is {loss.item()} ({bad}); lower [train].lr or "
                    "check this site's data; its update is dropped this round")
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if len(parts) > 1:
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
    logs = {name: total / max(steps, 1) for name, total in sums.items()}
    return {**logs, "steps": steps, "seconds": time.perf_counter() - start}


def where(ctx: ClientContext) -> str:
    return f"client {ctx.name!r}, round {ctx.round}"


class Trainer:
    """Local training of one model on a client's data with the [train] optimiser.

    ``ctx.trainer.train(ctx, model, extra_loss=..., steps=...)`` is what methods call; the loss
    is ``task.loss(logits, target) + model.auxiliary_loss(target) (models that have one, e.g.
    CLAM-SB) + extra_loss(model, inputs, target, logits)``. A fresh
    optimiser each round (its state stays local; methods that keep it use ``ctx.state``).
    """

    def train(self, ctx: ClientContext, model: nn.Module | None = None, *,
              extra_loss: ExtraLoss | None = None, steps: int | None = None) -> dict[str, float]:
        model = model if model is not None else ctx.model
        steps = steps or ctx.train.local_steps
        optimizer = make_optimizer(model, ctx.train)

        auxiliary = getattr(model, "auxiliary_loss", None)  # e.g. CLAM-SB's instance loss

        def step(batch):
            inputs, target = batch
            logits = ctx.task.forward(model, inputs)
            loss = ctx.task.loss(logits, target)
            if auxiliary is not None:
                loss = loss + auxiliary(target)
            if extra_loss is not None:
                loss = loss + extra_loss(model, inputs, target, logits)
            return loss

        return optimise(steps, step, [optimizer], batches=ctx.task.batches(ctx.data.train, ctx.seed),
                        seed=ctx.seed, where=where(ctx), modules=[model])


def local_train(ctx: ClientContext, *, extra_loss: ExtraLoss | None = None,
                steps: int | None = None, model: nn.Module | None = None) -> dict[str, float]:
    """Train ``model`` (default ``ctx.model``) with this job's trainer (see :class:`Trainer`)."""
    trainer = ctx.trainer if ctx.trainer is not None else Trainer()
    return trainer.train(ctx, model, extra_loss=extra_loss, steps=steps)
