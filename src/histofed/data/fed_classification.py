"""Classification and MIL federations: CRCHisto patches, feature bags and their synthetic twins.

Registered names (see ``histofed data list``):
- ``crchisto-dirichlet``  nucleus patches, 4 classes, Dirichlet label skew over ``num_clients``.
- ``slides-bags``         your own CLAM-style bags + labels CSV; by site, else stratified.
- ``ucsb-breast-bags``    58 real UCSB breast TMA bags, 3 stratified clients.
- ``synthetic-patches`` / ``synthetic-bags``  no data needed, build in well under a second.

Options arrive as keyword arguments (from TOML or ``--option key=value`` strings); each builder
states its defaults, coerces strings to the default's type and rejects unknown names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histofed.data.bags import BagDataset, Standardizer, read_bag, read_bag_labels
from histofed.data.federation import (
    ClientData,
    Federation,
    merge_options,
    register_federation,
    under_data_root,
)
from histofed.data.partition import (
    BySourcePartitioner,
    DirichletPartitioner,
    StratifiedPartitioner,
    partition_like,
    stratified_split,
)
from histofed.data.patches import CRCHISTO_CLASSES, PatchDataset, patches_by_split, read_crchisto
from histofed.data.synthetic import synthetic_bags, synthetic_patches



def _hist(labels: np.ndarray, k: int) -> list[int]:
    return np.bincount(labels, minlength=k).tolist()


@register_federation(
    "crchisto-dirichlet",
    task="classification",
    description="CRCHisto nucleus patches (4 classes), Dirichlet label skew over num_clients",
)
def build_crchisto_dirichlet(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """CRCHisto nucleus-type classification with Dirichlet label skew.

    The upstream split is kept: the 70 train images' patches are split over clients with
    ``DirichletPartitioner`` (usual grid alpha = 0.1, 0.3, 0.5, 1.0; smaller = more skew). The
    validation (10 images) and test (20 images) patches are shared out class by class in
    proportion to the clients' training counts of that class: every client is evaluated on
    (nearly) its own label mix, no test image is seen in training and no test patch is dropped.
    (A client's test mix is its train mix reweighted by the upstream test/train ratio of each
    class, e.g. 'others' is 4 % of test but 10 % of train.) Patches, not images, are
    partitioned, as in the label-skew literature, so one training image can feed several clients.

    Options: num_clients=5, alpha=0.5, patch_size=32, min_size=50 (training patches per
    client), one_based=True (subtract 1 from the MATLAB coordinates), augment=True.
    """
    opt = merge_options(
        "crchisto-dirichlet",
        options,
        dict(num_clients=5, alpha=0.5, patch_size=32, min_size=50, one_based=True, augment=True),
    )
    if not opt["alpha"] > 0:  # fail before reading 100 images (the partitioner checks too)
        raise ValueError(
            f"Dirichlet alpha must be > 0 (e.g. 0.1, 0.3, 0.5, 1.0), got {opt['alpha']}"
        )
    root = Path(data_root) / "crchisto"
    splits = patches_by_split(read_crchisto(root, one_based=opt["one_based"]), opt["patch_size"])
    missing = {"train", "validation", "test"} - set(splits)
    if missing:
        raise ValueError(f"{root / 'split.csv'}: no image in split(s) {sorted(missing)}")
    (xtr, ytr), (xva, yva), (xte, yte) = splits["train"], splits["validation"], splits["test"]
    K = len(CRCHISTO_CLASSES)
    part = DirichletPartitioner(
        labels=ytr,
        alpha=opt["alpha"],
        num_partitions=opt["num_clients"],
        seed=seed,
        min_size=opt["min_size"],
    )
    counts = np.stack([np.bincount(ytr[p], minlength=K) for p in part.partitions()])  # P x K
    rng = np.random.default_rng([seed, 1])
    val_parts, test_parts = partition_like(yva, counts, rng), partition_like(yte, counts, rng)
    clients = []
    for c, (tr, va, te) in enumerate(zip(part.partitions(), val_parts, test_parts, strict=True)):
        if len(te) == 0:
            raise ValueError(f"crchisto-dirichlet: client {c} got no test patches; raise min_size")
        clients.append(
            ClientData(
                name=f"client-{c}",
                train=PatchDataset(xtr[tr], ytr[tr], augment=opt["augment"], seed=seed + c),
                val=PatchDataset(xva[va], yva[va]) if len(va) else None,
                test=PatchDataset(xte[te], yte[te]),
                info={
                    "num_train": len(tr),
                    "num_val": len(va),
                    "num_test": len(te),
                    "label_hist_train": _hist(ytr[tr], K),
                    "label_hist_test": _hist(yte[te], K),
                },
            )
        )
    return Federation(
        name="crchisto-dirichlet",
        task="classification",
        clients=clients,
        num_classes=K,
        description=f"CRCHisto {opt['patch_size']}px nucleus patches, "
        f"Dirichlet alpha={opt['alpha']}",
        info={"class_names": list(CRCHISTO_CLASSES), "partitioner": "dirichlet", **opt},
    )


def _bag_federation(
    name: str,
    table_labels: np.ndarray,
    features: list[np.ndarray],
    parts: list[np.ndarray],
    client_names: list[str],
    class_names: list[str],
    *,
    seed: int,
    test_fraction: float,
    standardize: bool,
    description: str,
    info: dict[str, Any],
) -> Federation:
    """Per client: stratified train/test split (>= 1 test bag), optional standardising fitted
    on that client's train bags."""
    K = max(len(class_names), int(table_labels.max()) + 1)
    clients = []
    for c, (idx, cname) in enumerate(zip(parts, client_names, strict=True)):
        if len(idx) < 2:
            raise ValueError(
                f"{name}: client {cname!r} has {len(idx)} bag(s); it needs >= 2 "
                "(one to train, one to test)"
            )
        y = table_labels[idx]
        tr, te = stratified_split(y, test_fraction, np.random.default_rng([seed, 2, c]))
        if len(te) == 0:  # tiny client: move one bag of its most common class to test
            k = np.bincount(y[tr]).argmax()
            move = tr[np.flatnonzero(y[tr] == k)[0]]
            tr, te = tr[tr != move], np.array([move])
        tr, te = idx[tr], idx[te]
        std = Standardizer.fit([features[i] for i in tr]) if standardize else None
        clients.append(
            ClientData(
                name=cname,
                train=BagDataset([features[i] for i in tr], table_labels[tr], std),
                test=BagDataset([features[i] for i in te], table_labels[te], std),
                info={
                    "num_train": len(tr),
                    "num_test": len(te),
                    "label_hist_train": _hist(table_labels[tr], K),
                    "label_hist_test": _hist(table_labels[te], K),
                    "mean_instances": float(np.mean([len(features[i]) for i in idx])),
                },
            )
        )
    return Federation(
        name=name,
        task="mil",
        clients=clients,
        num_classes=K,
        description=description,
        info={"class_names": class_names, "feature_dim": features[0].shape[1], **info},
    )


@register_federation(
    "slides-bags",
    task="mil",
    needs_data_root=False,
    description="your .h5 feature bags: -o bags_dir=DIR -o labels_csv=FILE; by site or stratified",
)
def build_slides_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Whole-slide MIL from pre-extracted bags.

    Options: bags_dir, labels_csv (required; relative paths are taken under data_root),
    num_clients=3 (ignored when the CSV has a ``site`` or ``client`` column: natural split),
    test_fraction=0.3, standardize=False (per-feature, fitted on each client's train bags).
    """
    opt = merge_options(
        "slides-bags",
        options,
        dict(bags_dir=None, labels_csv=None, num_clients=3, test_fraction=0.3, standardize=False),
    )
    if opt["bags_dir"] is None or opt["labels_csv"] is None:
        raise ValueError(
            "federation 'slides-bags' needs options bags_dir=DIR and labels_csv=FILE "
            "(columns slide_id,label[,site]), e.g. --option bags_dir=features/h5"
        )
    table = read_bag_labels(
        under_data_root(opt["labels_csv"], data_root), under_data_root(opt["bags_dir"], data_root)
    )
    if table.groups is not None:
        part = BySourcePartitioner(groups=table.groups, seed=seed, min_size=2)
        names, how = part.partition_names, "by-source"
    else:
        part = StratifiedPartitioner(
            labels=table.labels, num_partitions=opt["num_clients"], seed=seed, min_size=2
        )
        names, how = [f"client-{c}" for c in range(part.num_partitions)], "stratified"
    features = [read_bag(p).features for p in table.paths]
    return _bag_federation(
        "slides-bags",
        table.labels,
        features,
        part.partitions(),
        names,
        table.class_names,
        seed=seed,
        test_fraction=opt["test_fraction"],
        standardize=opt["standardize"],
        description=f"{len(features)} slide bags, {how} over {len(names)} clients",
        info={"partitioner": how, **{k: str(v) for k, v in opt.items()}},
    )


@register_federation(
    "ucsb-breast-bags",
    task="mil",
    description="UCSB breast TMA MIL benchmark: 58 real bags, 3 stratified clients, 2 classes",
)
def build_ucsb_breast_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """58 labelled UCSB breast bags (708 handcrafted features) over stratified clients.

    Features are unnormalised (up to ~1e4), so by default each client standardises with
    statistics of its own training bags only (no cross-client or test leakage).

    Options: num_clients=3, test_fraction=0.3, standardize=True.
    """
    opt = merge_options(
        "ucsb-breast-bags", options, dict(num_clients=3, test_fraction=0.3, standardize=True)
    )
    folder = Path(data_root) / "bags" / "ucsb_breast"
    if not (folder / "labels.csv").is_file():
        raise FileNotFoundError(
            f"{folder / 'labels.csv'} not found: expected the UCSB breast bags "
            "(see shared/data/README.md, section bags/ucsb_breast)"
        )
    table = read_bag_labels(folder / "labels.csv", folder)
    part = StratifiedPartitioner(
        labels=table.labels, num_partitions=opt["num_clients"], seed=seed, min_size=2
    )
    features = [read_bag(p).features for p in table.paths]
    return _bag_federation(
        "ucsb-breast-bags",
        table.labels,
        features,
        part.partitions(),
        [f"client-{c}" for c in range(part.num_partitions)],
        table.class_names,
        seed=seed,
        test_fraction=opt["test_fraction"],
        standardize=opt["standardize"],
        description=f"UCSB breast bags, stratified over {opt['num_clients']} clients",
        info={"partitioner": "stratified", **opt},
    )


@register_federation(
    "synthetic-patches",
    task="classification",
    needs_data_root=False,
    description="synthetic nucleus patches (exact labels), Dirichlet label skew",
)
def build_synthetic_patches(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Synthetic patches split with Dirichlet label skew; each client's test set is drawn with
    its own training class frequencies.

    Options: num_clients=3, patches_per_client=96, test_per_client=48, alpha=0.5,
    num_classes=4, patch_size=32, min_size=16.
    """
    opt = merge_options(
        "synthetic-patches",
        options,
        dict(
            num_clients=3,
            patches_per_client=96,
            test_per_client=48,
            alpha=0.5,
            num_classes=4,
            patch_size=32,
            min_size=16,
        ),
    )
    rng = np.random.default_rng(seed)
    K, P = opt["num_classes"], opt["num_clients"]
    x, y = synthetic_patches(
        rng, P * opt["patches_per_client"], num_classes=K, size=opt["patch_size"]
    )
    part = DirichletPartitioner(
        labels=y, alpha=opt["alpha"], num_partitions=P, seed=seed, min_size=opt["min_size"]
    )
    clients = []
    for c, tr in enumerate(part.partitions()):
        probs = np.bincount(y[tr], minlength=K) / len(tr)
        xt, yt = synthetic_patches(
            rng, opt["test_per_client"], num_classes=K, size=opt["patch_size"], class_probs=probs
        )
        clients.append(
            ClientData(
                name=f"client-{c}",
                train=PatchDataset(x[tr], y[tr], augment=True, seed=seed + c),
                test=PatchDataset(xt, yt),
                info={
                    "num_train": len(tr),
                    "num_test": len(yt),
                    "label_hist_train": _hist(y[tr], K),
                    "label_hist_test": _hist(yt, K),
                },
            )
        )
    return Federation(
        name="synthetic-patches",
        task="classification",
        clients=clients,
        num_classes=K,
        description=f"synthetic patches, Dirichlet alpha={opt['alpha']}",
        info={"class_names": [f"class-{k}" for k in range(K)], "partitioner": "dirichlet", **opt},
    )


@register_federation(
    "synthetic-bags",
    task="mil",
    needs_data_root=False,
    description="synthetic MIL bags (positive iff witness tiles), stratified clients",
)
def build_synthetic_bags(*, data_root: Path | None, seed: int, **options: Any) -> Federation:
    """Synthetic feature bags; every client draws from the same concept (fixed witness mean).

    Options: num_clients=3, bags_per_client=24, dim=64, test_fraction=0.25, pos_fraction=0.5.
    """
    opt = merge_options(
        "synthetic-bags",
        options,
        dict(num_clients=3, bags_per_client=24, dim=64, test_fraction=0.25, pos_fraction=0.5),
    )
    rng = np.random.default_rng(seed)
    bags = synthetic_bags(
        rng,
        opt["num_clients"] * opt["bags_per_client"],
        dim=opt["dim"],
        pos_fraction=opt["pos_fraction"],
    )
    labels = np.array([b[2] for b in bags], np.int64)
    part = StratifiedPartitioner(
        labels=labels, num_partitions=opt["num_clients"], seed=seed, min_size=2
    )
    return _bag_federation(
        "synthetic-bags",
        labels,
        [b[0] for b in bags],
        part.partitions(),
        [f"client-{c}" for c in range(part.num_partitions)],
        ["negative", "positive"],
        seed=seed,
        test_fraction=opt["test_fraction"],
        standardize=False,
        description=f"synthetic bags, {opt['num_clients']} stratified clients",
        info={"partitioner": "stratified", **opt},
    )
