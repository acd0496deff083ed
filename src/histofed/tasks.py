"""What "train" and "evaluate" mean for each kind of federation: losses, data loaders and
evaluation loops for segmentation, tile classification and MIL bag classification."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from histofed.config import EvalConfig, TrainConfig
from histofed.registry import Registry


TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: ``@register_task("segmentation")`` adds a task kind under that name."""
    return TASKS.register(name)


@dataclass
class Task:
    """Base: subclasses define ``loss`` and ``evaluate``; ``batches`` and ``forward`` rarely change."""

    train_cfg: TrainConfig
    num_classes: int
    crop_size: int = 128
    headline: ClassVar[str] = "loss"  # the metric progress bars and summaries show

    def batches(self, dataset: Dataset, seed: int) -> Iterator:
        from histofed.algorithms.training import shuffled_batches

        return shuffled_batches(dataset, self.train_cfg.batch_size, seed)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: EvalConfig) -> dict[str, float]:
        raise NotImplementedError


@register_task("segmentation")
class SegmentationTask(Task):
    """Binary segmentation: BCE (+ soft Dice), sliding-window evaluation on whole tiles."""

    headline: ClassVar[str] = "dice"

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits, target: B x 1 x H x W
        bce = F.binary_cross_entropy_with_logits(logits, target)
        if self.train_cfg.loss == "bce":
            return bce
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dim=(1, 2, 3))
        denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
        soft_dice = 1 - (2 * inter + 1.0) / (denom + 1.0)
        return bce + soft_dice.mean()

    @torch.no_grad()
    def predict(self, model: nn.Module, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
        """Probabilities for one image [1, 3, H, W] -> [1, 1, H, W] by sliding windows (MONAI)."""
        from monai.inferers import sliding_window_inference

        window = cfg.window or self.crop_size
        return torch.sigmoid(sliding_window_inference(
            image, roi_size=(window, window), sw_batch_size=cfg.batch_size, predictor=model,
            overlap=cfg.overlap, mode="gaussian", padding_mode="reflect"))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: EvalConfig) -> dict[str, float]:
        """Loss, Dice/Jaccard/pixel accuracy and nucleus instance scores (AJI, PQ, SQ, F1).

        Instances: predictions by connected components (or a watershed when ``cfg`` has
        ``instances = "watershed"``); references by their own ids when the dataset keeps them
        (``SegmentationTiles.instances``), else connected components. ``ref_instance_ids`` is
        the fraction of images scored against ids (see :mod:`histofed.instances`).
        """
        from histofed.instances import InstanceOptions, instance_metrics
        from histofed.metrics import segmentation_metrics

        was_training = model.training
        model.eval()
        preds, targets, losses = [], [], []
        for i in range(len(dataset)):
            image, mask = dataset[i]  # 3 x H x W, 1 x H x W
            prob = self.predict(model, image[None], cfg)[0]  # 1 x H x W
            losses.append(F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), mask).item())
            preds.append((prob[0] >= cfg.threshold).numpy())
            targets.append(mask[0].numpy() > 0.5)
        model.train(was_training)
        refs = getattr(dataset, "instances", None) or targets  # H x W ids, else binary
        options = InstanceOptions(split=getattr(cfg, "instances", "components"))
        inst = instance_metrics(preds, refs, options)
        return {"loss": float(np.mean(losses)), **segmentation_metrics(preds, targets),
                **{k: inst[k] for k in ("aji", "pq", "sq", "f1", "ref_instance_ids")}}


@register_task("classification")
class ClassificationTask(Task):
    """Tile/patch classification with cross-entropy."""

    headline: ClassVar[str] = "balanced_accuracy"

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: EvalConfig) -> dict[str, float]:
        from histofed.metrics import classification_metrics

        was_training = model.training
        model.eval()
        logits, labels = [], []
        loader = DataLoader(dataset, batch_size=max(cfg.batch_size, 64), shuffle=False)
        for x, y in loader:
            logits.append(self.forward(model, x))
            labels.append(y)
        model.train(was_training)
        all_logits, all_labels = torch.cat(logits), torch.cat(labels)
        loss = F.cross_entropy(all_logits, all_labels).item()
        probs = torch.softmax(all_logits, dim=1).numpy()
        return {"loss": loss, **classification_metrics(probs, all_labels.numpy())}


@register_task("mil")
class MILTask(ClassificationTask):
    """Bag classification: one bag (N_i x D features) per step, since bag sizes differ."""

    def batches(self, dataset: Dataset, seed: int) -> Iterator:
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
            for i in order:
                feats, label = dataset[int(i)]
                yield feats[None], torch.as_tensor(label).reshape(1)  # 1 x N x D, 1
            epoch += 1

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, cfg: EvalConfig) -> dict[str, float]:
        from histofed.metrics import classification_metrics

        was_training = model.training
        model.eval()
        logits, labels = [], []
        for i in range(len(dataset)):
            feats, label = dataset[i]
            logits.append(self.forward(model, feats[None]))
            labels.append(int(label))
        model.train(was_training)
        all_logits, all_labels = torch.cat(logits), torch.tensor(labels)
        loss = F.cross_entropy(all_logits, all_labels).item()
        probs = torch.softmax(all_logits, dim=1).numpy()
        return {"loss": loss, **classification_metrics(probs, all_labels.numpy())}


def make_task(kind: str, train_cfg: TrainConfig, num_classes: int, crop_size: int = 128) -> Task:
    return TASKS.get(kind)(train_cfg=train_cfg, num_classes=num_classes, crop_size=crop_size)
