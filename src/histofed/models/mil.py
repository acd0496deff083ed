"""Multiple-instance learning heads over feature bags (N instances x D features per slide):
gated ABMIL (Ilse et al. 2018), CLAM-SB (Lu et al. 2021) and a small TransMIL (Shao et al. 2021).

Every model maps ``B x N x D`` to ``B x C`` logits. A model with an extra training term (CLAM's
instance clustering loss) exposes ``auxiliary_loss(target)`` computed from its last forward.
Every model also gives per-instance attention, ``instance_attention(bag)``: ``N x D`` (or
``1 x N x D``) -> ``N`` non-negative scores (the heatmaps of ``histofed slides heatmap``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from histofed.models.registry import register_model


@register_model("abmil")
class GatedABMIL(nn.Module):
    """Gated attention MIL (Ilse et al., ICML 2018).

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ),  z = sum_i a_i h_i,  logits = W z.

    Input ``1 x N x D`` (one bag), output ``1 x C``.
    """

    def __init__(self, *, in_dim: int = 512, hidden: int = 128, num_classes: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, hidden)
        self.attn_u = nn.Linear(hidden, hidden)
        self.attn_w = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, num_classes)

    def attention(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(bag)  # B x N x H
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))  # B x N x 1
        return torch.softmax(scores, dim=1), h

    def forward(self, bag: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x C
        a, h = self.attention(bag)
        return self.head((a * h).sum(dim=1))

    @torch.no_grad()
    def instance_attention(self, bag: torch.Tensor) -> torch.Tensor:
        """The pooling weights a_i of one bag: ``N x D`` or ``1 x N x D`` -> ``N`` (sum 1)."""
        return self.attention(_one_bag(bag))[0][0, :, 0]


def _one_bag(bag: torch.Tensor) -> torch.Tensor:
    """``N x D`` or ``1 x N x D`` -> ``1 x N x D`` (attention maps are per bag)."""
    if bag.dim() == 2:
        bag = bag[None]
    if bag.dim() != 3 or bag.shape[0] != 1:
        raise ValueError(f"instance attention needs one bag (N x D or 1 x N x D), got "
                         f"{tuple(bag.shape)}")
    return bag


def _instance_ce(logits: torch.Tensor, label: int) -> torch.Tensor:
    target = torch.full((logits.shape[0],), label, dtype=torch.long, device=logits.device)
    return nn.functional.cross_entropy(logits, target)


@register_model("clam-sb")
class CLAMSB(GatedABMIL):
    """CLAM, single attention branch (Lu et al., Nature Biomedical Engineering 2021).

    Gated attention pooling as in :class:`GatedABMIL`, plus one instance classifier per class
    trained with pseudo-labels: for a bag of class y, its ``k`` most attended instances are
    positives and its ``k`` least attended negatives of the class-y instance classifier,

        L_inst = CE(g_y(h_topk), 1) + CE(g_y(h_bottomk), 0)   (averaged over the 2k instances)
        L = bag_weight * CE(bag) + (1 - bag_weight) * L_inst

    ``forward`` returns the bag logits (``B x N x D -> B x C``) and caches attention and
    embeddings; :meth:`auxiliary_loss` ``(target)`` then gives ``(1 - bag_weight) / bag_weight *
    L_inst`` so that ``CE + auxiliary`` is L up to the factor ``bag_weight`` (the trainer adds it
    to the task loss). Choices of ours: cross-entropy instead of the smooth top-1 SVM for the
    instance loss; ``k`` is capped at N // 2 for small bags; only the in-class term (CLAM's
    ``subtyping = False``).
    """

    def __init__(self, *, in_dim: int = 512, hidden: int = 128, num_classes: int = 2,
                 dropout: float = 0.0, k_sample: int = 8, bag_weight: float = 0.7) -> None:
        if not 0 < bag_weight <= 1:
            raise ValueError(f"clam-sb: bag_weight must be in (0, 1], got {bag_weight}")
        super().__init__(in_dim=in_dim, hidden=hidden, num_classes=num_classes, dropout=dropout)
        self.instance_heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(num_classes))
        self.k_sample, self.bag_weight = k_sample, bag_weight
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, bag: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x C
        a, h = self.attention(bag)
        self._cache = (a, h)
        return self.head((a * h).sum(dim=1))

    def instance_loss(self, target: torch.Tensor) -> torch.Tensor:
        """L_inst of the last forward, averaged over its bags; ``target``: B labels."""
        if self._cache is None:
            raise RuntimeError("clam-sb: call forward before instance_loss")
        a, h = self._cache
        losses = []
        for b in range(h.shape[0]):
            n = h.shape[1]
            k = min(self.k_sample, n // 2)
            if k == 0:
                continue  # a one-instance bag has no pseudo-labels
            order = torch.argsort(a[b, :, 0], descending=True)  # N
            top, bottom = h[b, order[:k]], h[b, order[-k:]]  # k x H each
            head = self.instance_heads[int(target[b])]
            losses.append((_instance_ce(head(top), 1) + _instance_ce(head(bottom), 0)) / 2)
        return torch.stack(losses).mean() if losses else h.sum() * 0

    def auxiliary_loss(self, target: torch.Tensor) -> torch.Tensor:
        """``(1 - bag_weight) / bag_weight * L_inst`` of the last forward (then forgotten)."""
        loss = (1 - self.bag_weight) / self.bag_weight * self.instance_loss(target)
        self._cache = None
        return loss

    def __getstate__(self):  # copies and pickles never carry the last forward's graph
        state = dict(self.__dict__)
        state["_cache"] = None
        return state


class _Block(nn.Module):
    """Pre-norm multi-head self-attention + MLP (a standard transformer block)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x T x H
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:  # B x T x H -> B x (T - 1)
        """Softmax attention of the first (class) token to the other tokens, mean over heads."""
        y = self.norm1(x)
        weights = self.attn(y, y, y, need_weights=True, average_attn_weights=True)[1]  # B x T x T
        return weights[:, 0, 1:]


class _PPEG(nn.Module):
    """TransMIL's pyramid position encoding: depthwise 7/5/3 convolutions over the tokens laid
    out on a square grid, added to the tokens (the class token passes through)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
                                   for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:  # B x (1 + side^2) x H
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # B x H x s x s
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_model("transmil")
class TransMILLite(nn.Module):
    """A small TransMIL-style transformer (Shao et al., NeurIPS 2021).

    Instances are embedded, padded to a square number by repeating the first ones (as TransMIL
    does), prefixed with a class token, passed through block -> PPEG -> block, and the class
    token is classified: ``B x N x D -> B x C``. Ours: standard softmax attention instead of the
    Nystrom approximation (bags here are small), ``layers`` blocks after the PPEG minus one.
    """

    def __init__(self, *, in_dim: int = 512, hidden: int = 64, num_classes: int = 2,
                 heads: int = 4, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"transmil: hidden = {hidden} must be divisible by heads = {heads}")
        if layers < 1:
            raise ValueError(f"transmil: layers must be >= 1, got {layers}")
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.first = _Block(hidden, heads, dropout)
        self.ppeg = _PPEG(hidden)
        self.rest = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers - 1))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:  # B x N x D -> B x C
        return self._run(bag)[0]

    @torch.no_grad()
    def instance_attention(self, bag: torch.Tensor) -> torch.Tensor:
        """Attention of the class token to each instance in the *last* transformer block
        (mean over heads), ``N x D`` or ``1 x N x D`` -> ``N``. The attention a padding token
        (a repeat of instance i) receives is added to instance i's; the class token's attention
        to itself is left out, so the scores sum to at most 1. (A choice of ours: TransMIL's
        authors show no heatmaps; attention rollout over all blocks is an alternative.)"""
        bag = _one_bag(bag)
        n = bag.shape[1]
        cls = self._run(bag, want_attention=True)[1][0]  # s^2 (padded tokens included)
        owner = torch.arange(len(cls)) % n  # padding token n + j repeats instance j mod n
        return torch.zeros(n, dtype=cls.dtype).index_add_(0, owner, cls)

    def _run(self, bag: torch.Tensor, want_attention: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.embed(bag)  # B x N x H
        n = h.shape[1]
        side = max(1, int(math.ceil(math.sqrt(n))))
        if side * side > n:  # pad by repeating the first instances
            reps = -(-(side * side - n) // n)
            h = torch.cat([h, h.repeat(1, reps, 1)[:, : side * side - n]], dim=1)
        x = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # B x (1+s^2) x H
        blocks = [self.first, *self.rest]
        attention = None
        for i, block in enumerate(blocks):
            if want_attention and i == len(blocks) - 1:
                attention = block.cls_attention(x)  # B x s^2
            x = block(x)
            if i == 0:
                x = self.ppeg(x, side)
        return self.head(self.norm(x[:, 0])), attention
