"""Image-bag MIL federations: bags of real or synthetic image patches seen through a fixed encoder.

A bag is a set of ``h x w`` RGB patches; the MIL models see ``phi(A(patch))`` features, where A
is a stain normaliser (:mod:`histofed.stain`, Macenko by default) and phi a fixed patch encoder
(:mod:`histofed.models.encoders`: the seeded random ConvNet, or a local checkpoint). Because
the patches stay available (``ImageBagDataset.patches``), FedWSIDD can distil *image* bags
(``space = "images"``) and every site can turn received synthetic patches into features with
the same phi and A.

Registered names:
- ``synthetic-image-bags``  positive bags hold larger-nucleus patches; no data needed, fast.
- ``monuseg-organ-bags``    a *proxy* slide-level task from real tiles: each MoNuSeg 1000 x 1000
  image (a 40x TCGA region, not a whole slide) cut into patches is one bag, labelled by its
  organ; bags are spread over stratified clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from histofed.data.federation import Federation, merge_options, register_federation
from histofed.data.formats import DataFormatError, read_meta_csv
from histofed.data.partition import StratifiedPartitioner, stratified_split
from histofed.data.synthetic import synthetic_image_bags

_ENCODER_DEFAULTS = dict(encoder_width=32, encoder_depth=3, encoder_pool=2, encoder_seed=0,
                         encoder_path="", stain="macenko")


def to_float(patches: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``N x h x w x 3`` uint8 -> ``N x 3 x h x w`` float32 in [0, 1] (float input passes)."""
    x = torch.as_tensor(patches)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    return x.float()


class ImageBagDataset(Dataset):
    """Bags of patches: item -> (``phi(A(patches))`` N_i x D float32, label int64 scalar).

    Features are computed once (phi and A are fixed). ``patches`` keeps each bag's uint8 pixels
    (N_i x h x w x 3) for image-space distillation; :meth:`encode` maps any patches to features.
    """

    standardizer = None  # features of a fixed phi need no per-site scaling

    def __init__(self, patches_list: list[np.ndarray], labels: np.ndarray, encoder: nn.Module,
                 normaliser: nn.Module | None = None, batch_size: int = 256) -> None:
        labels = np.asarray(labels, np.int64)
        if len(patches_list) != len(labels):
            raise ValueError(f"{len(patches_list)} bags but {len(labels)} labels")
        sizes = {p.shape[1:] for p in patches_list}
        if len(sizes) > 1:
            raise ValueError(f"bags hold patches of different shapes {sorted(sizes)}")
        self.patches = patches_list
        self.labels = labels
        self.encoder = encoder.eval().requires_grad_(False)
        self.normaliser = normaliser if normaliser is not None else nn.Identity()
        self.batch_size = batch_size
        self.features = [self.encode(to_float(p)) for p in patches_list]

    @property
    def patch_size(self) -> int:
        return int(self.patches[0].shape[1])

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1]) if self.features else 0

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``P x 3 x h x w`` float in [0, 1] -> ``P x D`` float32 features phi(A(x)).

        Runs on one torch thread (restored after): Macenko is a loop of tiny per-patch ops,
        measured 14x slower on 2 threads than on 1 on a busy 2-core machine."""
        from histofed.models import one_torch_thread

        with one_torch_thread():
            out = [self.encoder(self.normaliser(x[i:i + self.batch_size].clamp(0, 1)).float())
                   for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0, 0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], torch.tensor(self.labels[index], dtype=torch.int64)


def _phi_and_stain(opt: dict[str, Any], patch_size: int) -> tuple[nn.Module, nn.Module]:
    """phi (the seeded random ConvNet, or ``encoder_path``) and A from the options."""
    from histofed.models.encoders import RandomCNNEncoder, load_encoder
    from histofed.stain import make_normalizer

    arch = {"name": "random-cnn", "width": opt["encoder_width"], "depth": opt["encoder_depth"],
            "pool": opt["encoder_pool"], "seed": opt["encoder_seed"]}
    if opt["encoder_path"]:
        phi = load_encoder(opt["encoder_path"], arch=arch, tile_size=patch_size)
    else:
        phi = RandomCNNEncoder(**{k: v for k, v in arch.items() if k != "name"})
    if opt["stain"] not in ("none", "macenko"):
        raise ValueError(f"image-bag federations: stain must be 'none' or 'macenko' (a shared "
                         f"reference all sites agree on), got {opt['stain']!r}")
    return phi, make_normalizer(opt["stain"])


def _image_bag_federation(name: str, bags: list[np.ndarray], labels: np.ndarray,
                          class_names: list[str], opt: dict[str, Any], *, seed: int,
                          description: str) -> Federation:
    """Stratified clients, a stratified train/test split per client (>= 1 test bag)."""
    from histofed.data.federation import ClientData

    phi, stain = _phi_and_stain(opt, int(bags[0].shape[1]))
    part = StratifiedPartitioner(labels=labels, num_partitions=opt["num_clients"], seed=seed,
                                 min_size=2)
    k = len(class_names)
    clients = []
    for c, idx in enumerate(part.partitions()):
        tr, te = stratified_split(labels[idx], opt["test_fraction"],
                                  np.random.default_rng([seed, 2, c]))
        if len(te) == 0:
            tr, te = tr[1:], tr[:1]
        tr, te = idx[tr], idx[te]
        clients.append(ClientData(
            name=f"client-{c}",
            train=ImageBagDataset([bags[i] for i in tr], labels[tr], phi, stain),
            test=ImageBagDataset([bags[i] for i in te], labels[te], phi, stain),
            info={"num_train": len(tr), "num_test": len(te),
                  "label_hist_train": np.bincount(labels[tr], minlength=k).tolist(),
                  "label_hist_test": np.bincount(labels[te], minlength=k).tolist(),
                  "patches_per_bag": float(np.mean([len(bags[i]) for i in idx]))}))
    return Federation(name=name, task="mil", clients=clients, num_classes=k,
                      description=description,
                      info={"class_names": class_names, "feature_dim": int(phi.out_dim)
                            if hasattr(phi, "out_dim") else None, "partitioner": "stratified",
                            **opt})


@register_federation(
    "synthetic-image-bags",
    task="mil",
    needs_data_root=False,
    description="synthetic bags of image patches (positive iff larger-nucleus witnesses), "
                "stratified clients; features phi(A(patch))",
)
def build_synthetic_image_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Options: num_clients=2, bags_per_client=8, patch_size=16, test_fraction=0.25, and the
    encoder/stain options encoder_width=32, encoder_depth=3, encoder_pool=2 (D = width x pool^2;
    pool 1 gave near-constant features on MoNuSeg, std 0.014), encoder_seed=0,
    encoder_path="" (a local checkpoint instead of the random ConvNet), stain="macenko"|"none".
    """
    opt = merge_options("synthetic-image-bags", options,
                        dict(num_clients=2, bags_per_client=8, patch_size=16, test_fraction=0.25,
                             **_ENCODER_DEFAULTS))
    rng = np.random.default_rng(seed)
    drawn = synthetic_image_bags(rng, opt["num_clients"] * opt["bags_per_client"],
                                 size=opt["patch_size"])
    labels = np.array([y for _, y in drawn], np.int64)
    return _image_bag_federation("synthetic-image-bags", [b for b, _ in drawn], labels,
                                 ["negative", "positive"], opt, seed=seed,
                                 description=f"synthetic image bags over {opt['num_clients']} "
                                             "stratified clients")


def monuseg_bags(root: Path, organs: list[str], downsample: int, patch_size: int
                 ) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Each MoNuSeg image of the given organs, reduced by ``downsample`` and cut into a grid of
    non-overlapping ``patch_size`` patches: one bag (``P x s x s x 3`` uint8) per image.

    Raises:
        FileNotFoundError / DataFormatError: no meta.csv with organs, a named organ with no image.
    """
    from PIL import Image

    meta = read_meta_csv(root / "meta.csv")
    if not meta or "organ" not in next(iter(meta.values())):
        raise FileNotFoundError(f"{root / 'meta.csv'} with columns id,organ not found: expected "
                                "MoNuSeg at <data_root>/nuclei/monuseg (see shared/data/README.md)")
    missing = [o for o in organs if not any(r["organ"] == o for r in meta.values())]
    if missing:
        have = sorted({r["organ"] for r in meta.values()})
        raise DataFormatError(f"{root / 'meta.csv'}: no image of organ(s) {missing}; "
                              f"organs there: {', '.join(have)}")
    bags, labels = [], []
    for image_id, row in sorted(meta.items()):
        if row["organ"] not in organs:
            continue
        img = Image.open(root / "images" / f"{image_id}.png").convert("RGB")
        if downsample > 1:
            img = img.reduce(downsample)
        rgb = np.asarray(img)  # H x W x 3
        n_y, n_x = rgb.shape[0] // patch_size, rgb.shape[1] // patch_size
        if n_y * n_x == 0:
            raise DataFormatError(f"{image_id}: {rgb.shape[1]} x {rgb.shape[0]} px after "
                                  f"downsample {downsample} holds no {patch_size} px patch")
        grid = rgb[:n_y * patch_size, :n_x * patch_size].reshape(
            n_y, patch_size, n_x, patch_size, 3).swapaxes(1, 2)  # n_y x n_x x s x s x 3
        bags.append(np.ascontiguousarray(grid.reshape(-1, patch_size, patch_size, 3)))
        labels.append(organs.index(row["organ"]))
    return bags, np.asarray(labels, np.int64), organs


@register_federation(
    "monuseg-organ-bags",
    task="mil",
    description="PROXY slide task: each MoNuSeg image = a bag of patches labelled by organ, "
                "stratified clients; features phi(A(patch))",
)
def build_monuseg_organ_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """A labelled image-bag task from real tiles, named for what it is: a proxy. A MoNuSeg image
    is a 1000 x 1000 region at 40x (about 250 um), not a whole slide, and the organ is an easy,
    tissue-level label; it exercises image-space FedWSIDD on real H&E, nothing more.

    Options: organs="breast,kidney,liver,prostate" (6 images each; bladder, colon and stomach
    have 2), downsample=4 (1000 px -> 250 px, about 10x), patch_size=32 (49 patches a bag),
    num_clients=2, test_fraction=0.3, and the encoder/stain options of
    ``synthetic-image-bags``.
    """
    opt = merge_options("monuseg-organ-bags", options,
                        dict(organs="breast,kidney,liver,prostate", downsample=4, patch_size=32,
                             num_clients=2, test_fraction=0.3, **_ENCODER_DEFAULTS))
    organs = [o.strip() for o in opt["organs"].split(",") if o.strip()]
    if len(organs) < 2:
        raise ValueError(f"monuseg-organ-bags: organs needs >= 2 names, got {opt['organs']!r}")
    root = Path(data_root) / "nuclei" / "monuseg"
    bags, labels, names = monuseg_bags(root, organs, opt["downsample"], opt["patch_size"])
    return _image_bag_federation("monuseg-organ-bags", bags, labels, names, opt, seed=seed,
                                 description=f"MoNuSeg images as organ-labelled patch bags "
                                             f"(proxy), {opt['num_clients']} stratified clients")
