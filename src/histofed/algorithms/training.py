"""The local training loop every method shares; methods add terms via ``extra_loss``."""

from __future__ import annotations

import time

import torch

from histofed.algorithms.base import ClientContext, ClientTrainingError
from histofed.tasks import ExtraLoss, make_optimizer


def local_train(
    ctx: ClientContext,
    *,
    extra_loss: ExtraLoss | None = None,
    steps: int | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Train ``model`` (default ``ctx.model``) for ``steps`` optimiser steps on the client's data.

    The loss is ``task.loss(logits, target) + extra_loss(model, inputs, target, logits)``.
    A fresh optimiser is made each round (its state stays local; methods that keep it store
    it in ``ctx.state``).

    Raises:
        ClientTrainingError: the loss became NaN/inf; names the client, round and step.
    """
    model = model if model is not None else ctx.model
    steps = steps or ctx.train.local_steps
    optimizer = make_optimizer(model, ctx.train)
    model.train()
    batches = ctx.task.batches(ctx.data.train, ctx.seed)
    total, start = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        inputs, target = next(batches)
        logits = ctx.task.forward(model, inputs)
        loss = ctx.task.loss(logits, target)
        if extra_loss is not None:
            loss = loss + extra_loss(model, inputs, target, logits)
        if not torch.isfinite(loss):
            raise ClientTrainingError(
                f"client {ctx.name!r}, round {ctx.round}, step {step}: loss is {loss.item()} "
                "(lower [train].lr or check this client's data); its update is dropped this round"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return {"loss": total / steps, "steps": steps, "seconds": time.perf_counter() - start}
