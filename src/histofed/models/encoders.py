"""Patch encoders phi: tiles (``B x 3 x h x w`` in [0, 1]) -> feature vectors (``B x D``).

No pretrained weights can be downloaded here, so an encoder is either

- ``random-cnn``: a fixed, randomly initialised ConvNet as in distribution-matching dataset
  distillation (Zhao & Bilen, WACV 2023): ``depth`` blocks of conv3x3 -> instance norm -> ReLU
  -> 2x2 average pooling, then adaptive average pooling to ``pool x pool``; D = width * pool^2.
  Its weights come from its own ``seed`` (not the run's per-client seed), so every hospital
  that names the same seed holds the *same* phi, which feature matching across sites needs.
- a user's local checkpoint (:func:`load_encoder`): TorchScript (``torch.jit.save``), or a
  state dict plus the registered architecture it belongs to. Its output size is checked on a
  dummy tile before anything is written.

:func:`extract_bags` turns a folder of slides into CLAM-style bags with one of them
(resumable; a slide that cannot be read is named and skipped).

Example:
    >>> phi = RandomCNNEncoder(width=8, depth=2, pool=1, seed=0)
    >>> phi(torch.rand(4, 3, 32, 32)).shape
    torch.Size([4, 8])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histofed.models.registry import register_model


class EncoderError(ValueError):
    """An encoder checkpoint that cannot be used (unreadable, wrong output size)."""


@register_model("random-cnn")
class RandomCNNEncoder(nn.Module):
    """A fixed random ConvNet phi (Zhao & Bilen 2023); parameters are frozen."""

    def __init__(self, *, width: int = 64, depth: int = 3, pool: int = 2, seed: int = 0,
                 num_classes: int = 0, in_channels: int = 3) -> None:
        super().__init__()
        del num_classes  # an encoder has no classes; accepted so build_model can build it
        layers: list[nn.Module] = []
        gen = torch.Generator().manual_seed(seed)
        channels = in_channels
        for _ in range(depth):
            conv = nn.Conv2d(channels, width, 3, padding=1)
            with torch.no_grad():  # seeded from its own generator: the same phi everywhere
                nn.init.kaiming_uniform_(conv.weight, a=5 ** 0.5, generator=gen)
                conv.bias.uniform_(-0.1, 0.1, generator=gen)
            layers += [conv, nn.GroupNorm(width, width, affine=False), nn.ReLU(), nn.AvgPool2d(2)]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = width * pool * pool
        self.requires_grad_(False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # B x 3 x h x w -> B x D
        return self.net(tiles)


def check_output(encoder: nn.Module, *, tile_size: int, out_dim: int | None,
                 source: str) -> int:
    """Run one dummy tile; returns D. Raises EncoderError if the output is not ``1 x out_dim``."""
    with torch.no_grad():
        try:
            out = encoder(torch.zeros(1, 3, tile_size, tile_size))
        except Exception as err:  # noqa: BLE001  (any failure of a user's model)
            raise EncoderError(f"{source}: the encoder failed on a 1 x 3 x {tile_size} x "
                               f"{tile_size} tile ({err}); check tile size and architecture") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{source}: the encoder must return B x D features, got {shape} for "
                           "one tile; strip the classifier head (e.g. return the pooled trunk)")
    if out_dim is not None and out.shape[1] != out_dim:
        raise EncoderError(f"{source}: the encoder gives {out.shape[1]} features per tile, but "
                           f"{out_dim} were asked for; set out_dim = {out.shape[1]} or use the "
                           "checkpoint your MIL models were trained with")
    return int(out.shape[1])


def load_encoder(path: str | Path, *, arch: dict[str, Any] | None = None, tile_size: int = 224,
                 out_dim: int | None = None) -> nn.Module:
    """Load a local encoder checkpoint and check its output size.

    Args:
        path: a TorchScript file, or a state dict (``torch.save(model.state_dict())``).
        arch: for a state dict, the registered model it belongs to, ``{"name": ..., **options}``.
        tile_size: side of the tiles it will see (for the check).
        out_dim: expected features per tile (None: any).

    Raises:
        FileNotFoundError: no such file.
        EncoderError: neither TorchScript nor a state dict (with ``arch``), keys that do not fit
            ``arch``, or an output that is not ``B x out_dim``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
    try:
        encoder: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise EncoderError(f"{path}: neither TorchScript nor a torch state dict ({err})") from None
        if not isinstance(state, dict):
            raise EncoderError(f"{path}: holds a {type(state).__name__}, not a state dict; save "
                               "model.state_dict() or a TorchScript module")
        if arch is None:
            raise EncoderError(f"{path} is a state dict: name its architecture, e.g. "
                               'arch = {name = "random-cnn", width = 64}')
        from histofed.models import build_model

        spec = dict(arch)
        encoder = build_model(spec, num_classes=0)
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"{path} does not fit {spec}: missing keys {missing[:3]}, "
                               f"unexpected keys {unexpected[:3]}")
    encoder.eval()
    check_output(encoder, tile_size=tile_size, out_dim=out_dim, source=str(path))
    return encoder


@torch.no_grad()
def encode_tiles(encoder: nn.Module, tiles: np.ndarray | torch.Tensor,
                 batch_size: int = 64) -> np.ndarray:
    """``N x h x w x 3`` uint8 (or ``N x 3 x h x w`` float in [0, 1]) -> ``N x D`` float32."""
    x = torch.as_tensor(tiles)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 255.0
    out = [encoder(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif",
                  ".vms", ".vmu")


@dataclass
class ExtractReport:
    """What :func:`extract_bags` did: bags written, bags already there, slides that failed
    (name -> reason), tiles encoded and the time it took."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else float("nan")


def extract_bags(slides: str | Path | list[str | Path], out_dir: str | Path, encoder: nn.Module,
                 *, tile_size: int = 256, batch_size: int = 32, tissue_threshold: float = 0.5,
                 progress: bool = True, **resolution: Any) -> ExtractReport:
    """Slides -> CLAM-style ``.h5`` bags (``features``, ``coords``), one per slide, resumable.

    A slide whose bag already exists (and reads back) is skipped; a slide OpenSlide cannot open,
    or with no tissue, is named in ``report.failed`` and the others continue. Each bag is
    written atomically by ``histofed.data.slides.extract_features``: nothing is written half.

    Args:
        slides: a folder (its slide files, sorted) or a list of slide paths.
        out_dir: where ``<slide stem>.h5`` go (created).
        encoder: phi (``B x 3 x h x w`` in [0, 1] -> ``B x D``), e.g. :func:`load_encoder`.
        tile_size, batch_size, tissue_threshold, resolution (magnification=, mpp=,
            assume_mpp=): as in ``extract_features``.
    """
    import time

    from histofed.data.bags import read_bag
    from histofed.data.formats import DataFormatError
    from histofed.data.slides import extract_features

    if isinstance(slides, (str, Path)):
        folder = Path(slides)
        if not folder.is_dir():
            raise FileNotFoundError(f"slides folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"{folder} holds no slide files ({', '.join(SLIDE_SUFFIXES)})")
    else:
        paths = [Path(p) for p in slides]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractReport()
    start = time.perf_counter()
    for path in paths:
        target = out_dir / f"{path.stem}.h5"
        if target.exists():
            try:
                read_bag(target)
                report.skipped.append(path.name)
                continue
            except (DataFormatError, OSError):
                pass  # unreadable leftover: extract again (written atomically)
        try:
            extract_features(path, encoder, target, tile_size=tile_size, batch_size=batch_size,
                             tissue_threshold=tissue_threshold, progress=progress, **resolution)
        except (ValueError, OSError) as err:  # SlideError, NoTissueError, missing file, ...
            report.failed[path.name] = str(err)
            continue
        report.written.append(path.name)
        report.tiles += int(read_bag(target).features.shape[0])
    report.seconds = time.perf_counter() - start
    return report
