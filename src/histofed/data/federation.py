"""What every federation yields: named clients, each with its own train/val/test datasets.

A federation is built by a registered builder from a data root and an explicit seed:

    @register_federation("nuclei-multisource", task="segmentation",
                         description="one client per source/organ")
    def build(*, data_root: Path | None, seed: int, **options) -> Federation: ...

Dataset contracts (all tensors are torch, channels first):
- segmentation train: item -> (image float32 [3, c, c] in [0, 1], mask float32 [1, c, c] in {0, 1});
  random crops + flips/rot90 + light HSV jitter; ``reseed(seed: int)`` fixes the crops/augmentations
  of the next pass so a round is reproducible.
- segmentation eval (val/test): whole images, item -> (image float32 [3, H, W], mask float32 [1, H, W]);
  sizes vary, evaluate with batch size 1 and sliding-window inference.
- classification: item -> (image float32 [3, p, p], label int64 scalar); attribute ``labels`` (np.int64 [N]).
- mil: item -> (features float32 [N_i, D], label int64 scalar); attribute ``labels``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from histofed.registry import Registry, closest

MAX_CLIENTS = 1000  # sites per federation: cross-silo pathology has tens, not millions
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

Task = Literal["segmentation", "classification", "mil"]

# A client/site name becomes a file name (checkpoints/.../clients/<name>.npz, final/personal/):
# one path component, portable to every file system, never "." or "..".
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def site_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a client/site (it becomes a file name), or None when it can."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name) or name.endswith("."):
        return (f"{name!r} cannot name a site: it becomes a file name in the run directory, so "
                "use 1-100 letters, digits, '-', '_' or '.', starting with a letter or digit "
                f"(no '/', '\\', spaces or '..'), e.g. {safe_site_name(str(name))!r}")
    return None


def safe_site_name(name: str) -> str:
    """A suggestion: ``name`` with every run of unsafe characters replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:100] or "site"



@dataclass
class ClientData:
    """One hospital's data. ``info`` holds summary facts (source, organ, counts) for tables."""

    name: str
    train: Dataset
    test: Dataset
    val: Dataset | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        """Number of training examples (tiles, patches or bags), used as the FedAvg weight."""
        return int(self.info.get("num_train", len(self.train)))


@dataclass
class Federation:
    name: str
    task: Task
    clients: list[ClientData]
    num_classes: int  # 1 for binary segmentation
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [c.name for c in self.clients]
        for name in names:
            problem = site_name_problem(name)
            if problem:
                raise ValueError(f"federation {self.name!r}: client {problem}")
        if len({n.lower() for n in names}) != len(names):  # one file on case-blind disks
            raise ValueError(f"federation {self.name!r}: duplicate client names {names} "
                             "(names that differ only in case count as the same)")
        for c in self.clients:
            if len(c.train) == 0:
                raise ValueError(
                    f"federation {self.name!r}: client {c.name!r} has no training data; "
                    "drop it from the federation or lower the minimum partition size"
                )

    @property
    def client_names(self) -> list[str]:
        return [c.name for c in self.clients]


@dataclass(frozen=True)
class FederationSpec:
    name: str
    task: Task
    description: str
    builder: Callable[..., Federation]
    needs_data_root: bool = True


FEDERATIONS: Registry[FederationSpec] = Registry("federation")


def register_federation(
    name: str, *, task: Task, description: str, needs_data_root: bool = True
) -> Callable[[Callable[..., Federation]], Callable[..., Federation]]:
    """Register a federation builder ``f(*, data_root, seed, **options) -> Federation``."""

    def decorator(fn: Callable[..., Federation]) -> Callable[..., Federation]:
        FEDERATIONS.add(name, FederationSpec(name, task, description, fn, needs_data_root))
        return fn

    return decorator


def build_federation(
    name: str, *, data_root: Path | None, seed: int, **options: Any
) -> Federation:
    """Build a registered federation; errors name the federation and the missing data."""
    import histofed.data.registry  # noqa: F401  (registers the built-in federations)

    spec = FEDERATIONS.get(name)
    if spec.needs_data_root and data_root is None:
        raise ValueError(
            f"federation {name!r} reads real data: pass --data-root PATH or set HISTOFED_DATA "
            "(e.g. ../shared/data), or use the 'synthetic-nuclei' federation"
        )
    unseen = options.pop("unseen", None) or []
    federation = spec.builder(data_root=Path(data_root) if data_root else None, seed=seed,
                              **options)
    return hold_out(federation, unseen) if unseen else federation


def hold_out(federation: Federation, unseen: list[str] | str) -> Federation:
    """Keep the clients named in ``unseen`` out of training: they come last (so training
    clients keep indices 0..K-1), are marked ``info["unseen"] = True`` and every tile they hold
    (train, val and test) becomes their evaluation set, ``test``.

    Raises:
        ValueError: an unknown name (lists the valid ones), or every client named.
    """
    names = [unseen] if isinstance(unseen, str) else list(unseen)
    valid = federation.client_names
    for name in names:
        if name not in valid:
            raise ValueError(
                f"[federation].unseen: no client {name!r} in federation {federation.name!r}."
                f"{closest(str(name), valid)} Valid: {', '.join(valid)}")
    if len(set(names)) >= len(valid):
        raise ValueError(f"[federation].unseen names every client of {federation.name!r} "
                         f"({', '.join(valid)}): at least one must train")
    held = [dataclasses.replace(c, test=_everything(c), val=None, info={**c.info, "unseen": True})
            for c in federation.clients if c.name in names]  # copies: the input is left as it was
    kept = [c for c in federation.clients if c.name not in names]
    return dataclasses.replace(federation, clients=kept + held,
                               info={**federation.info, "unseen": names})


def _everything(client: ClientData) -> Dataset:
    """All of a held-out client's data as one evaluation set: whole tiles for segmentation
    (its training crops come from whole images too), every item otherwise."""
    from torch.utils.data import ConcatDataset

    parts = [d for d in (client.train, client.val, client.test) if d is not None]
    if all(hasattr(d, "images") and hasattr(d, "masks") for d in parts):
        from histofed.data.datasets import SegmentationTiles

        images = [im for d in parts for im in d.images]
        masks = [m for d in parts for m in getattr(d, "instances", d.masks)]  # ids where kept
        return SegmentationTiles(images, masks)
    return ConcatDataset(parts)


def under_data_root(path: str | Path, data_root: Path | None) -> Path:
    """``path`` itself when absolute (or without a data root), else ``data_root / path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or data_root is None else Path(data_root) / path


def merge_options(federation: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge ``given`` into ``defaults``; coerce to the default's type; reject unknown keys.

    Shared by every federation builder so options behave alike (CLI strings are coerced).
    """
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        hint = closest(unknown[0], list(defaults))
        raise ValueError(
            f"federation {federation!r}: unknown option(s) {unknown}.{hint} Valid: {valid}")
    out = dict(defaults)
    for key, value in given.items():
        kind = type(defaults[key])
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError
                value = value.lower() in _TRUE
            elif kind in (int, float) and not isinstance(value, bool):
                value = kind(value)
                if kind is int and isinstance(given[key], float) and value != given[key]:
                    raise ValueError
            elif kind is not type(None) and not isinstance(value, kind):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(
                f"federation {federation!r}: option {key}={given[key]!r} must be a "
                f"{kind.__name__} (default {defaults[key]!r})"
            ) from None
        out[key] = value
    clients = out.get("num_clients")
    if isinstance(clients, int) and not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(
            f"federation {federation!r}: num_clients = {clients} must be in 1..{MAX_CLIENTS} "
            "(each client is a site with its own data, model copy and checkpoint files)")
    return out
