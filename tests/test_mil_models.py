"""MIL heads (ABMIL, CLAM-SB, TransMIL-lite) and patch encoders (random ConvNet, checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histofed.config import NamedConfig
from histofed.models import build_model, client_model_spec
from histofed.models.encoders import (
    EncoderError,
    RandomCNNEncoder,
    encode_tiles,
    load_encoder,
)


@pytest.mark.parametrize("name", ["abmil", "clam-sb", "transmil"])
@pytest.mark.parametrize("n", [1, 5, 9])
def test_mil_shapes_and_permutation_invariance(name, n):
    model = build_model({"name": name, "hidden": 16}, num_classes=3, in_dim=7, seed=0).eval()
    bag = torch.randn(1, n, 7, generator=torch.Generator().manual_seed(n))
    out = model(bag)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    if name != "transmil":  # attention pooling is permutation invariant; TransMIL's PPEG is not
        torch.testing.assert_close(model(bag[:, torch.randperm(n)]), out, atol=1e-5, rtol=1e-5)


def test_clam_instance_loss_by_hand():
    """k = 1 on a 3-instance bag: the most attended instance is a positive, the least attended
    a negative of the label's instance classifier; loss = mean of the two CEs."""
    model = build_model({"name": "clam-sb", "hidden": 4, "k_sample": 1, "bag_weight": 0.5},
                        num_classes=2, in_dim=3, seed=1)
    bag = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(0))
    model(bag)
    a, h = model._cache
    order = torch.argsort(a[0, :, 0], descending=True)
    head = model.instance_heads[1]
    expected = (F.cross_entropy(head(h[0, order[:1]]), torch.tensor([1])) +
                F.cross_entropy(head(h[0, order[-1:]]), torch.tensor([0]))) / 2
    torch.testing.assert_close(model.instance_loss(torch.tensor([1])), expected)
    model(bag)
    torch.testing.assert_close(model.auxiliary_loss(torch.tensor([1])), expected)  # 0.5/0.5 = 1
    assert model._cache is None  # forgotten once used
    model(torch.randn(1, 1, 3))  # one instance: no pseudo-labels, zero loss, not an error
    assert model.auxiliary_loss(torch.tensor([0])).item() == 0.0
    with pytest.raises(ValueError, match="bag_weight"):
        build_model({"name": "clam-sb", "bag_weight": 0.0}, num_classes=2, in_dim=3)


def test_transmil_learns_a_toy_bag_task(one_thread):
    """Positive bags hold one shifted instance: a few Adam steps separate them."""
    model = build_model({"name": "transmil", "hidden": 16, "heads": 2}, num_classes=2, in_dim=4,
                        seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    bags = torch.randn(8, 6, 4, generator=g)  # 8 bags of 6 instances, as one batch
    labels = torch.tensor([0, 1] * 4)
    bags[labels == 1, 2] += 3.0
    for _ in range(30):
        loss = F.cross_entropy(model(bags), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    preds = model(bags).argmax(1)
    assert (preds == labels).all()


def test_heterogeneous_draw_gives_different_mil_heads():
    pool = NamedConfig("abmil", {"heterogeneous": [{"name": "abmil"}, {"name": "clam-sb"},
                                                   {"name": "transmil", "hidden": 32}]})
    names = {client_model_spec(pool, client=f"c{i}", cid=i, seed=0, defaults={"in_dim": 5})["name"]
             for i in range(12)}
    assert names == {"abmil", "clam-sb", "transmil"}


def test_random_encoder_is_seeded_by_its_own_seed():
    a = build_model({"name": "random-cnn", "width": 8, "depth": 2, "seed": 3}, num_classes=0,
                    seed=11)
    b = build_model({"name": "random-cnn", "width": 8, "depth": 2, "seed": 3}, num_classes=0,
                    seed=99)  # another client's init seed: the same phi
    c = RandomCNNEncoder(width=8, depth=2, seed=4)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), c(x))
    assert a(x).shape == (2, 8 * 4) and not any(p.requires_grad for p in a.parameters())
    tiles = (np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3))).astype(np.uint8)
    feats = encode_tiles(a, tiles, batch_size=2)
    assert feats.shape == (3, 32) and feats.dtype == np.float32


class _Small(torch.nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, out, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_load_torchscript_and_state_dict_checkpoints(tmp_path):
    scripted = torch.jit.script(_Small(6))
    torch.jit.save(scripted, tmp_path / "enc.pt")
    enc = load_encoder(tmp_path / "enc.pt", tile_size=16, out_dim=6)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(enc(x), scripted(x))
    with pytest.raises(EncoderError, match=r"enc.pt: the encoder gives 6 features per tile, but "
                                           r"512 were asked for; set out_dim = 6"):
        load_encoder(tmp_path / "enc.pt", tile_size=16, out_dim=512)
    ref = RandomCNNEncoder(width=4, depth=2, pool=1, seed=5)
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    loaded = load_encoder(tmp_path / "state.pt", tile_size=16, out_dim=4,
                          arch={"name": "random-cnn", "width": 4, "depth": 2, "pool": 1, "seed": 0})
    torch.testing.assert_close(loaded(x), ref(x))  # the checkpoint's weights, not seed 0's
    with pytest.raises(EncoderError, match="state dict: name its architecture"):
        load_encoder(tmp_path / "state.pt", tile_size=16)
    with pytest.raises(EncoderError, match="does not fit"):
        load_encoder(tmp_path / "state.pt", tile_size=16, arch={"name": "random-cnn", "depth": 3,
                                                                 "width": 4})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="junk.pt: neither TorchScript nor a torch state dict"):
        load_encoder(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_encoder(tmp_path / "missing.pt")


def test_extract_bags_from_real_slides_resumes_and_names_failures(shared_data, tmp_path,
                                                                   one_thread):
    """Both real slides -> bags with a small random phi; a slide OpenSlide cannot open is named
    and the others continue; a second call skips the finished bags."""
    from histofed.data.bags import read_bag
    from histofed.models.encoders import extract_bags

    slides = tmp_path / "slides"
    slides.mkdir()
    for p in sorted((shared_data / "wsi").glob("*.svs")):
        (slides / p.name).symlink_to(p)  # the data stays where it is
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    phi = RandomCNNEncoder(width=4, depth=2, pool=1, seed=0)
    report = extract_bags(slides, tmp_path / "bags", phi, tile_size=256, progress=False)
    assert report.written == ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"]
    assert list(report.failed) == ["broken.svs"] and "broken.svs" in report.failed["broken.svs"]
    assert not (tmp_path / "bags" / "broken.h5").exists()  # nothing written half
    bag = read_bag(tmp_path / "bags" / "cmu-1-small-region.h5")
    assert bag.features.shape[1] == 4 and bag.coords.shape == (len(bag.features), 2)
    assert report.tiles > 0 and report.tiles_per_second > 0
    again = extract_bags(slides, tmp_path / "bags", phi, tile_size=256, progress=False)
    assert again.skipped == report.written and again.written == [] and again.tiles == 0


def test_slides_extract_cli_names_a_broken_slide_and_exits_1(tmp_path):
    from typer.testing import CliRunner

    from histofed.cli import app

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "broken.svs").write_bytes(b"not a slide")
    result = CliRunner().invoke(app, ["slides", "extract", str(slides), "--out",
                                      str(tmp_path / "bags")])
    assert result.exit_code == 1, result.output
    assert "failed: broken" in result.output and "0 bag(s) written" in result.output
    assert not list((tmp_path / "bags").glob("*.h5"))  # nothing written half


def test_abmil_instance_attention_is_the_pooling_weight():
    """forward == head(sum_i a_i h_i) with the a_i instance_attention returns; equivariant."""
    model = build_model({"name": "clam-sb", "hidden": 8}, num_classes=2, in_dim=5, seed=0).eval()
    bag = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))  # N x D
    a = model.instance_attention(bag)
    assert a.shape == (7,) and (a > 0).all()
    torch.testing.assert_close(a.sum(), torch.tensor(1.0))
    pooled = (a[:, None] * model.embed(bag)).sum(0)
    torch.testing.assert_close(model.head(pooled)[None], model(bag[None]))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.instance_attention(bag[perm]), a[perm])
    with pytest.raises(ValueError, match="one bag"):
        model.instance_attention(torch.randn(2, 3, 5))


def test_abmil_attends_to_witness_instances_after_training(one_thread):
    """Positive bags hold one shifted instance; after training, it gets the most attention."""
    model = build_model({"name": "abmil", "hidden": 16}, num_classes=2, in_dim=4, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    bags = torch.randn(8, 6, 4, generator=g)
    labels = torch.tensor([0, 1] * 4)
    bags[labels == 1, 2] += 3.0  # instance 2 is the witness
    for _ in range(60):
        loss = F.cross_entropy(model(bags), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(model.instance_attention(bags[i]).argmax() == 2 for i in range(1, 8, 2))


@pytest.mark.parametrize("n, layers", [(4, 2), (5, 1), (5, 3), (1, 2)])
def test_transmil_instance_attention_folds_padding(n, layers):
    """Class-token attention of the last block: N scores, padding folded onto the instances it
    repeats, so scores + the class token's self-attention sum to 1."""
    model = build_model({"name": "transmil", "hidden": 8, "heads": 2, "layers": layers},
                        num_classes=2, in_dim=3, seed=0).eval()
    bag = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(n))
    a = model.instance_attention(bag)
    assert a.shape == (n,) and (a > 0).all() and a.sum() < 1
    captured = {}
    last = model.rest[-1] if len(model.rest) else model.first
    handle = last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(bag)
    handle.remove()
    y = last.norm1(captured["x"])
    full = last.attn(y, y, y, need_weights=True)[1][0, 0]  # 1 + s^2 weights of the class token
    torch.testing.assert_close(a.sum() + full[0], torch.tensor(1.0))
    torch.testing.assert_close(a[0], full[1] + full[1 + n:][::n].sum() if n > 1 else full[1:].sum())
