"""Deep clustering for timbre separation: losses, loss balancing, clustering attention, k-means.

The reusable pieces of the timbre-separation model (SPEC section 4): every time-frequency unit
gets a D-dimensional embedding, units of one instrument are pulled together and units of different
instruments pushed apart, and at inference the embeddings of the active units are clustered.

Losses
    * :func:`deep_clustering_loss`: ``||V V^T - Y Y^T||_F^2`` (Hershey, Chen, Le Roux & Watanabe,
      "Deep clustering: discriminative embeddings for segmentation and separation", ICASSP 2016)
      in its low-rank form ``||V^T V||^2 - 2 ||V^T Y||^2 + ||Y^T Y||^2``: cost
      ``O(N D^2)``, the ``N x N`` affinity matrices are never built.
    * :func:`leaky_deep_clustering_loss`: ``||LeakyReLU(V V^T) - Y Y^T||_F^2`` (negative
      similarity between different classes is penalised less, slope 0.3). No low-rank form exists,
      so it is computed exactly over blocks of the matrix, with a hand-written backward that
      recomputes each block: memory ``O(chunk^2)``, time ``O(N^2 D)``.
    * :func:`focal_loss`: Lin, Goyal, Girshick, He & Dollar, "Focal loss for dense object
      detection", ICCV 2017): ``-alpha_t (1 - p_t)^gamma log(p_t)``, for note / onset posteriors.

Loss balancing (:class:`LossBalancer`)
    * harmonic normalisation: ``alpha_i L_i = 1 / sum_j (1 / L_j)`` for every ``i``,
      low-pass filtered over steps;
    * dynamic weight averaging (Liu, Johns & Davison, "End-to-end multi-task learning with
      attention", CVPR 2019): ``w_i = K softmax_i(r_i / T)``, ``r_i = L_i(t-1) / L_i(t-2)``.

Attention (:class:`ClusteringAttention`)
    * flow attention (Wu, Wu, Xu, Wang & Long, "Flowformer: linearizing transformers with
      conservation flows", ICML 2022, section 3), and plain linear attention (Katharopoulos,
      Vyas, Pappas & Fleuret, "Transformers are RNNs", ICML 2020, feature map elu + 1).
      Both are linear in the number of units ``N``.

Clustering (:func:`kmeans`, :func:`estimate_num_clusters`, :func:`cluster_units`)
    * Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii, SODA 2007); the number of
      clusters by the silhouette (Rousseeuw, 1987) or by the eigengap of the embeddings' second
      moment matrix.

Shapes: embeddings ``V [batch, N, D]``, assignments ``Y [batch, N, C]``, unit weights ``[batch, N]``
where ``N = F x T`` time-frequency units (flatten ``[batch, F, T]`` with ``.flatten(1)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8
_NORMS = ("active", "all", "none")


# --------------------------------------------------------------------------------------------
# Deep clustering losses
# --------------------------------------------------------------------------------------------

def _check_dc_inputs(v: torch.Tensor, y: torch.Tensor, weights, norm: str):
    if v.dim() != 3:
        raise ValueError(f"embeddings must be [batch, N, D], got shape {tuple(v.shape)}; "
                         "flatten [batch, D, F, T] with v.flatten(2).transpose(1, 2)")
    if not y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"integer labels must be [batch, N], got shape {tuple(y.shape)}")
        if (y < 0).any():
            raise ValueError("negative labels: exclude units with weights=0 instead")
        y = F.one_hot(y, int(y.max()) + 1).to(v.dtype)
    if y.dim() != 3 or y.shape[:2] != v.shape[:2]:
        raise ValueError(f"assignments must be [batch, N, C] matching embeddings "
                         f"{tuple(v.shape)}, got {tuple(y.shape)}")
    y = y.to(v.dtype)
    if weights is not None:
        if weights.shape != v.shape[:2]:
            raise ValueError(f"weights must be [batch, N] = {tuple(v.shape[:2])}, "
                             f"got {tuple(weights.shape)}")
        w = weights.to(v.dtype).unsqueeze(-1)
        v, y = v * w, y * w
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    return v, y


def _dc_normaliser(v: torch.Tensor, weights, norm: str) -> torch.Tensor | float:
    """Denominator of the loss: ``(sum_i w_i^2)^2`` ('active'), ``N^2`` ('all') or 1 ('none')."""
    if norm == "none":
        return 1.0
    if norm == "all" or weights is None:
        return float(v.shape[1]) ** 2
    return weights.to(v.dtype).pow(2).sum(-1).pow(2).clamp_min(EPS)


def deep_clustering_loss(v: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None,
                         norm: str = "active") -> torch.Tensor:
    """Deep clustering loss ``||V V^T - Y Y^T||_F^2`` per batch item, in low-rank form.

    Args:
        v: embeddings ``[batch, N, D]`` (usually unit-norm per unit).
        y: assignments ``[batch, N, C]``, one-hot or soft (float), or integer labels ``[batch, N]``.
        weights: optional per-unit weights or 0/1 mask ``[batch, N]``; they multiply the rows of
            ``V`` and ``Y``, so the pair ``(i, j)`` counts ``(w_i w_j)^2`` times (pass ``sqrt(w)``
            for the per-pair weight ``w_i w_j`` of Wang, Le Roux & Hershey, ICASSP 2018).
            Units with weight 0 (silence, padding) are ignored.
        norm: ``'active'`` (default) divides by ``(sum_i w_i^2)^2``, the squared number of active
            units for a 0/1 mask: the loss is then the mean over the pairs that count, so it does
            not depend on how much padding or silence an item has, and items of different
            lengths weigh the same. ``'all'`` divides by ``N^2`` (Hershey et al.), ``'none'``
            returns the plain sum. Without weights, ``'active'`` equals ``'all'``.

    Returns:
        ``[batch]``.

    ``||V V^T - Y Y^T||^2 = ||V^T V||^2 - 2 ||V^T Y||^2 + ||Y^T Y||^2`` because
    ``||A B^T||_F^2 = tr(A^T A B^T B)`` (Hershey et al. 2016).
    """
    vw, yw = _check_dc_inputs(v, y, weights, norm)
    vtv = torch.bmm(vw.transpose(1, 2), vw)  # [batch, D, D]
    vty = torch.bmm(vw.transpose(1, 2), yw)  # [batch, D, C]
    yty = torch.bmm(yw.transpose(1, 2), yw)  # [batch, C, C]
    loss = vtv.pow(2).sum((1, 2)) - 2 * vty.pow(2).sum((1, 2)) + yty.pow(2).sum((1, 2))
    return loss / _dc_normaliser(v, weights, norm)


def _blocks(n: int, chunk: int):
    """Pairs of row ranges ``(I, J)`` with ``J >= I`` covering the upper triangle of ``N x N``."""
    edges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    for i, rows in enumerate(edges):
        for cols in edges[i:]:
            yield rows, cols


class _ChunkedLeakyDC(torch.autograd.Function):
    """``sum_ij (leaky(v_i . v_j) - y_i . y_j)^2`` per batch item, one block at a time.

    The matrix is symmetric, so only blocks on and above the diagonal are computed (off-diagonal
    ones count twice). Forward keeps no block; backward recomputes each one. With ``S = V V^T``,
    ``R = leaky(S) - Y Y^T`` (both symmetric): ``dL/dV = 4 (R * leaky'(S)) V``, ``dL/dY = -4 R Y``.
    """

    @staticmethod
    def forward(ctx, v, y, slope: float, chunk: int):
        ctx.save_for_backward(v, y)
        ctx.slope, ctx.chunk = slope, chunk
        total = v.new_zeros(v.shape[0])
        for (a, b), (c, d) in _blocks(v.shape[1], chunk):
            r = F.leaky_relu_(torch.bmm(v[:, a:b], v[:, c:d].transpose(1, 2)), slope)
            r.baddbmm_(y[:, a:b], y[:, c:d].transpose(1, 2), alpha=-1)
            total += (1 if a == c else 2) * torch.linalg.vector_norm(r, dim=(1, 2)).square()
        return total

    @staticmethod
    def backward(ctx, grad):
        v, y = ctx.saved_tensors
        need_v, need_y = ctx.needs_input_grad[:2]
        gv = torch.zeros_like(v) if need_v else None
        gy = torch.zeros_like(y) if need_y else None
        for (a, b), (c, d) in _blocks(v.shape[1], ctx.chunk):
            s = torch.bmm(v[:, a:b], v[:, c:d].transpose(1, 2))
            r = F.leaky_relu(s, ctx.slope).baddbmm_(y[:, a:b], y[:, c:d].transpose(1, 2), alpha=-1)
            if need_y:
                gy[:, a:b].baddbmm_(r, y[:, c:d])
                if a != c:
                    gy[:, c:d].baddbmm_(r.transpose(1, 2), y[:, a:b])
            if need_v:
                # R * leaky'(S) in one pass: the backward kernel of leaky_relu (slope where S <= 0)
                r = torch.ops.aten.leaky_relu_backward(r, s, ctx.slope, False)
                gv[:, a:b].baddbmm_(r, v[:, c:d])
                if a != c:
                    gv[:, c:d].baddbmm_(r.transpose(1, 2), v[:, a:b])
        scale = grad.view(-1, 1, 1)
        return (4 * scale * gv if need_v else None), (-4 * scale * gy if need_y else None), \
            None, None


def leaky_deep_clustering_loss(v: torch.Tensor, y: torch.Tensor,
                               weights: torch.Tensor | None = None, negative_slope: float = 0.3,
                               chunk_size: int = 512, norm: str = "active") -> torch.Tensor:
    """``||LeakyReLU(V V^T) - Y Y^T||_F^2`` per batch item, exact, computed in blocks.

    The relaxed variant: a negative similarity between units of different classes costs
    ``(0.3 s)^2`` instead of ``s^2``. LeakyReLU does not factorise, so unlike
    :func:`deep_clustering_loss` this costs ``O(N^2 D)`` time. It is computed over blocks of
    ``chunk_size x chunk_size`` units of the (symmetric) matrix, upper triangle only, with a
    hand-written backward that recomputes each block: memory ``O(batch x chunk_size^2)`` beyond
    the inputs, in forward and backward (no double backward).

    Arguments, weights (``(w_i w_j)^2`` per pair: LeakyReLU is positively homogeneous, so
    weighting rows of ``V`` equals weighting the entries) and ``norm`` as in
    :func:`deep_clustering_loss`. Returns ``[batch]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if weights is not None and (weights < 0).any():
        raise ValueError("weights must be non-negative (LeakyReLU(w_i w_j s) = w_i w_j "
                         "LeakyReLU(s) only holds for w >= 0)")
    vw, yw = _check_dc_inputs(v, y, weights, norm)
    loss = _ChunkedLeakyDC.apply(vw, yw, float(negative_slope), int(chunk_size))
    return loss / _dc_normaliser(v, weights, norm)


# --------------------------------------------------------------------------------------------
# Focal loss
# --------------------------------------------------------------------------------------------

def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = None,
               gamma: float = 2.0, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Binary focal loss on logits, e.g. note / onset posteriors ``[batch, pitch, frames]``.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al. 2017) with ``p = sigmoid(logit)``,
    ``p_t = p`` for a positive and ``1 - p`` for a negative, ``alpha_t = alpha`` for a positive and
    ``1 - alpha`` for a negative (``alpha=None``: no class weighting). Soft targets ``t`` in
    ``[0, 1]`` mix the two terms linearly. ``gamma=0, alpha=None`` is binary cross-entropy.
    Computed with log-sigmoids, stable for large logits.

    Args:
        logits, targets: same shape ``[batch, ...]``.
        mask: optional, broadcastable to ``logits``; 0 marks padding (excluded).
        reduction: ``'mean'`` (default) mean over the unmasked elements of each item ->
            ``[batch]``; ``'sum'`` -> ``[batch]``; ``'none'`` -> elementwise (masked set to 0).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    targets = targets.to(logits.dtype)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = -targets * log_p * torch.exp(gamma * log_not_p)  # (1 - p)^gamma
    neg = -(1 - targets) * log_not_p * torch.exp(gamma * log_p)  # p^gamma
    if alpha is not None:
        pos, neg = alpha * pos, (1 - alpha) * neg
    loss = pos + neg
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.flatten(1).sum(-1)
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if mask is None:
        return total / loss[0].numel()
    count = torch.broadcast_to(mask, logits.shape).to(loss.dtype).flatten(1).sum(-1)
    return total / count.clamp_min(1)


# --------------------------------------------------------------------------------------------
# Loss balancing
# --------------------------------------------------------------------------------------------

class LossBalancer(nn.Module):
    """Weights for a sum of losses: harmonic normalisation and/or dynamic weight averaging.

    ``total, weights = balancer([loss_a, loss_b, ...])``; ``total = sum_i weights_i L_i`` keeps
    the gradients of the losses, ``weights [K]`` are detached: ``weights = alpha * w``.

    * Harmonic normalisation, on the detached losses of the step:
      ``alpha_new_i = H / L_i`` with ``H = 1 / sum_j (1 / L_j)``, so ``alpha_new_i L_i = H`` for
      every ``i``: the weighted losses are equal, each the "parallel resistance" of all the
      losses, so the smallest sets the scale. Low-pass filtered (IIR) on the weights:
      ``alpha <- beta alpha + (1 - beta) alpha_new``, the first update takes ``alpha_new``.
      Losses must be positive.
    * DWA (Liu et al. 2019): ``w_i = K softmax_i(r_i / T)``, ``r_i = L_i(t-1) / L_i(t-2)``
      from the raw losses of the two previous updates (training steps; the paper uses epoch
      means); ``w = 1`` until two are known. Slower-decreasing
      losses get more weight; normalise the scale too (``harmonic=True``), else the scale gap
      hides DWA's reweighting.

    State (``alpha``, loss history, counters) is in buffers, so ``state_dict`` / a SpeechBrain
    checkpointer saves and restores it. Only calls in training mode update the state; in eval
    mode the current weights are applied unchanged.
    """

    def __init__(self, n_losses: int, harmonic: bool = True, beta: float = 0.9, dwa: bool = True,
                 temperature: float = 2.0, eps: float = 1e-12):
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.n_losses, self.harmonic, self.beta = n_losses, harmonic, beta
        self.dwa, self.temperature, self.eps = dwa, temperature, eps
        f64 = torch.float64
        self.register_buffer("alpha", torch.ones(n_losses, dtype=f64))
        self.register_buffer("n_alpha", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.ones(2, n_losses, dtype=f64))  # L(t-2), L(t-1)
        self.register_buffer("n_history", torch.zeros((), dtype=torch.long))

    def dwa_weights(self) -> torch.Tensor:
        """``K softmax(r / T)`` from the stored history, or ones before two updates."""
        if not self.dwa or self.n_history < 2:
            return torch.ones_like(self.alpha)
        ratio = self.history[1] / self.history[0].clamp_min(self.eps)
        return self.n_losses * torch.softmax(ratio / self.temperature, 0)

    def _push_history(self, losses: torch.Tensor):
        self.history.copy_(torch.stack([self.history[1], losses]))
        self.n_history += 1

    def forward(self, losses: Sequence[torch.Tensor]):
        """``losses``: K scalar tensors (or a ``[K]`` tensor) -> ``(total, weights [K])``."""
        stacked = torch.stack([torch.as_tensor(x) for x in losses]) if not torch.is_tensor(
            losses) else losses
        if stacked.shape != (self.n_losses,):
            raise ValueError(f"expected {self.n_losses} scalar losses, got shape "
                             f"{tuple(stacked.shape)}")
        value = stacked.detach().to(self.alpha)
        alpha = self.alpha
        if self.harmonic:
            if (value <= 0).any():
                raise ValueError(f"harmonic normalisation needs positive losses, got "
                                 f"{value.tolist()}; shift the loss (e.g. SI-SNR loss + 50) or "
                                 "use harmonic=False")
            inv = 1.0 / value
            alpha_new = inv / inv.sum()  # alpha_i = H / L_i with H = 1 / sum_j (1 / L_j)
            if self.n_alpha == 0:
                alpha = alpha_new
            elif self.training:
                alpha = self.beta * self.alpha + (1 - self.beta) * alpha_new
            if self.training:
                self.alpha.copy_(alpha)
                self.n_alpha += 1
        weights = alpha * self.dwa_weights()
        if self.training and self.dwa:
            self._push_history(value)
        weights = weights.to(stacked.dtype)
        return (weights * stacked).sum(), weights


# --------------------------------------------------------------------------------------------
# Linear-complexity attention
# --------------------------------------------------------------------------------------------

def _unit_measure(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-unit mass ``[batch, 1, N, 1]``: the weights normalised by their sum (the design's
    ``mask / mask.sum()``), or uniform ``1 / N``; an all-zero item gets mass 0 everywhere."""
    b, _, n, _ = like.shape
    if weights is None:
        return like.new_full((1, 1, n, 1), 1.0 / n)
    w = weights.reshape(b, n).to(like.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(like.dtype).tiny)
    return w[:, None, :, None]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     weights: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention (Katharopoulos et al. 2020) on non-negative features.

    ``out_i = q_i . (sum_j m_j k_j v_j^T) / (q_i . sum_j m_j k_j + eps)``, i.e. softmax attention
    with ``exp(q.k)`` replaced by ``q.k`` of feature-mapped ``q, k``, the key/value sums weighted by
    the unit mass ``m`` (weights / their sum, or uniform). ``q, k [batch, heads, N, d]`` (already
    feature-mapped), ``v [batch, heads, N, e]``, ``weights [batch, N]`` -> ``[batch, heads, N, e]``.
    Cost ``O(N d e)``.
    """
    m = _unit_measure(weights, k)
    km = k * m
    kv = torch.einsum("bhnd,bhne->bhde", km, v)
    denom = torch.einsum("bhnd,bhd->bhn", q, km.sum(2)) + eps
    return torch.einsum("bhnd,bhde->bhne", q, kv) / denom.unsqueeze(-1)


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   weights: torch.Tensor | None = None, eps: float = 1e-6,
                   source_clamp: float | None = None) -> torch.Tensor:
    """Flow attention (Flowformer, Wu et al. 2022, section 3) with per-unit mass.

    Units are sinks (queries, results) and sources (keys, values); ``q, k`` are non-negative
    features ``[batch, heads, N, d]``, ``v [batch, heads, N, e]``. With unit mass ``m_j`` (weights
    normalised by their sum; uniform without weights) every sum over units is ``m``-weighted:

    * incoming flow of sink i ``I_i = q_i . sum_j m_j k_j``, outgoing flow of source j
      ``O_j = k_j . sum_i m_i q_i``;
    * conservation: ``I^_i = q_i . sum_j m_j k_j / O_j`` (sink with unit-outgoing sources),
      ``O^_j = k_j . sum_i m_i q_i / I_i`` (source with unit-incoming sinks);
    * competition ``c_j = exp(O^_j) / sum_k m_k exp(O^_k)`` (softmax over sources, mean 1 under
      ``m``), allocation ``a_i = sigmoid(I^_i)`` (the paper's ``n / m`` length ratio is 1 here);
    * ``out_i = a_i q_i . (sum_j m_j k_j (c_j v_j)^T) / I_i``.

    With uniform mass this is Flowformer's non-causal flow attention (their sums over units
    equal ours times N, and every ratio cancels). A unit of weight 0 receives a result but has no
    influence on any other unit. ``source_clamp``: optional upper clamp of ``O^`` (the reference
    code clamps at 1 "for stability"; off by default because ``O^`` has mean ~1). Cost ``O(N d e)``.
    """
    m = _unit_measure(weights, k)
    qm, km = q * m, k * m
    incoming = torch.einsum("bhnd,bhd->bhn", q, km.sum(2)) + eps
    outgoing = torch.einsum("bhnd,bhd->bhn", k, qm.sum(2)) + eps
    conserved_in = torch.einsum("bhnd,bhd->bhn", q, (km / outgoing.unsqueeze(-1)).sum(2))
    conserved_out = torch.einsum("bhnd,bhd->bhn", k, (qm / incoming.unsqueeze(-1)).sum(2))
    if source_clamp is not None:
        conserved_out = conserved_out.clamp(max=source_clamp)
    allocation = torch.sigmoid(conserved_in)
    # weighted softmax; the shift uses units with mass only, so massless units change nothing
    m_units = m.squeeze(-1).expand_as(conserved_out)
    shift = conserved_out.detach().masked_fill(m_units == 0, float("-inf")).amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    expo = torch.exp(conserved_out - shift)
    competition = expo / (expo * m_units).sum(-1, keepdim=True).clamp_min(
        torch.finfo(expo.dtype).tiny)
    kv = torch.einsum("bhnd,bhne->bhde", km, v * competition.unsqueeze(-1))
    out = torch.einsum("bhnd,bhde->bhne", q, kv) / incoming.unsqueeze(-1)
    return out * allocation.unsqueeze(-1)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` (Katharopoulos et al. 2020), positive."""
    return F.elu(x) + 1


_FEATURE_MAPS = {"sigmoid": torch.sigmoid, "elu": elu_feature_map}


class ClusteringAttention(nn.Module):
    """Clustering branch: one linear-complexity attention layer with residual, no feed-forward.

    ``x [batch, C, F, T]`` (or ``[batch, C, N]`` units) -> same shape::

        Q, K, V = conv_q(x), conv_k(x), conv_v(x)        # three 1x1 convs = input projections
        y = x + conv_out(attention(phi(Q), phi(K), V))   # output projection, residual

    ``kind='flow'``: :func:`flow_attention` with ``phi = sigmoid`` (competition between units);
    ``kind='linear'``: :func:`linear_attention` with ``phi = elu + 1``; ``feature_map`` overrides.
    Seed 004 found the input/output projections and the residual essential and a feed-forward
    block useless.

    ``weights`` (optional, ``[batch, F, T]`` / ``[batch, N]``, non-negative), e.g. the note
    posterior: the "Hebbian" memory. Keys and values (and, for flow attention, the
    sink sums that set the competition) are weighted by ``weights / weights.sum()``, so the memory
    holds what the notes hold: ``X = sum_j m_j phi(k_j) v_j^T`` plays the part of the seed's
    ``U^T U / sum(M)``.
    Every unit still reads from the memory; a unit of weight 0 does not write to it.
    """

    def __init__(self, channels: int, heads: int = 4, kind: str = "flow",
                 feature_map: str | None = None, eps: float = 1e-6,
                 source_clamp: float | None = None):
        super().__init__()
        if kind not in ("flow", "linear"):
            raise ValueError(f"kind must be 'flow' or 'linear', got {kind!r}")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        feature_map = feature_map or ("sigmoid" if kind == "flow" else "elu")
        if feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(_FEATURE_MAPS)}, "
                             f"got {feature_map!r}")
        self.channels, self.heads, self.kind, self.eps = channels, heads, kind, eps
        self.feature_map, self.source_clamp = feature_map, source_clamp
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_out = nn.Conv1d(channels, channels, 1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        return x.view(b, self.heads, c // self.heads, n).transpose(2, 3)  # [b, h, n, d]

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[1] != self.channels:
            raise ValueError(f"expected [batch, {self.channels}, F, T] or [batch, "
                             f"{self.channels}, N], got {tuple(x.shape)}")
        shape = x.shape
        units = x.flatten(2)  # [b, C, N]
        b, _, n = units.shape
        if weights is not None:
            if weights.numel() != b * n:
                raise ValueError(f"weights must have one value per unit ([batch, F, T] or "
                                 f"[batch, N] = [{b}, {n}]), got {tuple(weights.shape)}")
            weights = weights.reshape(b, n)
        phi = _FEATURE_MAPS[self.feature_map]
        q = phi(self._heads(self.conv_q(units)))
        k = phi(self._heads(self.conv_k(units)))
        v = self._heads(self.conv_v(units))
        if self.kind == "flow":
            out = flow_attention(q, k, v, weights, self.eps, self.source_clamp)
        else:
            out = linear_attention(q, k, v, weights, self.eps)
        out = out.transpose(2, 3).reshape(b, self.channels, n)
        return (units + self.conv_out(out)).view(shape)


# --------------------------------------------------------------------------------------------
# Clustering for inference
# --------------------------------------------------------------------------------------------

def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, k]``, clamped at 0."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with
    probability proportional to the squared distance to the nearest chosen centre."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen, device=gen.device))]
    closest = _sq_dist(x, x[idx]).squeeze(1)
    for _ in range(1, k):
        if closest.sum() <= 0:  # fewer distinct points than k: any point
            nxt = int(torch.randint(n, (1,), generator=gen, device=gen.device))
        else:
            nxt = int(torch.multinomial(closest, 1, generator=gen))
        idx.append(nxt)
        closest = torch.minimum(closest, _sq_dist(x, x[nxt:nxt + 1]).squeeze(1))
    return x[idx].clone()


def kmeans(x: torch.Tensor, k: int, n_init: int = 4, iters: int = 100, seed: int = 0,
           tol: float = 1e-6):
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs (lowest inertia).

    ``x [N, D]`` -> ``(labels [N] long, centroids [k, D], inertia float)``. Deterministic for a
    given ``seed`` (on a given device). Stops when the centroids move less than ``tol`` times the
    data's mean variance; an empty cluster is re-seeded with the point farthest from its centre.
    """
    if x.dim() != 2:
        raise ValueError(f"expected points [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got k={k} for N={n} points")
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    scale = x.var(0, unbiased=False).sum().clamp_min(torch.finfo(x.dtype).tiny)
    best = None
    for _ in range(max(1, n_init)):
        centroids = _kmeans_pp(x, k, gen)
        for _ in range(iters):
            dist = _sq_dist(x, centroids)
            labels = dist.argmin(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
            empty = torch.nonzero(counts == 0).flatten().tolist()
            if empty:
                far = dist.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
                for c, i in zip(empty, far.tolist()):
                    new[c] = x[i]
            shift = (new - centroids).pow(2).sum()
            centroids = new
            if shift <= tol * scale:
                break
        labels = _sq_dist(x, centroids).argmin(1)
        inertia = float((x - centroids[labels]).pow(2).sum())  # direct, no cancellation
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia)
    return best


def silhouette_score(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Rousseeuw 1987) of ``x [N, D]`` with ``labels [N]``; O(N^2) memory, so
    subsample first for large N. ``s_i = (b_i - a_i) / max(a_i, b_i)``, 0 for singletons."""
    k = int(labels.max()) + 1
    if k < 2:
        raise ValueError("the silhouette needs at least 2 clusters")
    d = torch.cdist(x, x)
    onehot = F.one_hot(labels, k).to(d.dtype)
    counts = onehot.sum(0)
    mean_to = d @ onehot  # [N, k] sums of distances
    own = counts[labels]
    a = mean_to.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    other = mean_to / counts.clamp_min(1)
    other = other.masked_fill(onehot.bool() | (counts == 0), float("inf"))
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(torch.finfo(d.dtype).tiny)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return float(s.mean())


def estimate_num_clusters(x: torch.Tensor, k_range: tuple[int, int] = (2, 6),
                          method: str = "silhouette", max_points: int = 2000, seed: int = 0,
                          **kmeans_kwargs) -> int:
    """Estimate the number of clusters of ``x [N, D]`` within ``k_range`` (inclusive).

    * ``'silhouette'`` (default, any embedding): k-means for every k on at most ``max_points``
      random points, keep the k of highest mean silhouette. Needs k >= 2.
    * ``'eigengap'`` (for deep-clustering embeddings): eigenvalues ``l_1 >= l_2 >= ...`` of the
      ``D x D`` second moment ``V^T V / N``; keep the k with the largest ratio ``l_k / l_{k+1}``.
      If training reached ``V V^T = Y Y^T``, ``V^T V`` has the nonzero eigenvalues of
      ``Y^T Y = diag(class sizes)``: exactly K of them. Cheap (all points, O(N D^2)) and allows
      k = 1, but assumes clusters along distinct directions (unit-norm, near-orthogonal).
    """
    if x.dim() != 2:
        raise ValueError(f"expected points [N, D], got shape {tuple(x.shape)}")
    x = x.detach().float() if not x.is_floating_point() else x.detach()
    k_lo, k_hi = k_range
    if method == "eigengap":
        k_hi = min(k_hi, x.shape[1] - 1)
        if not 1 <= k_lo <= k_hi:
            raise ValueError(f"eigengap needs 1 <= k_min <= k_max < D={x.shape[1]}, "
                             f"got k_range={k_range}")
        eig = torch.linalg.eigvalsh((x.T @ x / x.shape[0]).double()).flip(0).clamp_min(0)
        ratios = eig[k_lo - 1:k_hi] / (eig[k_lo:k_hi + 1] + 1e-12 * eig[0])
        return k_lo + int(ratios.argmax())
    if method != "silhouette":
        raise ValueError(f"method must be 'silhouette' or 'eigengap', got {method!r}")
    if x.shape[0] > max_points:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[:max_points]]
    k_lo, k_hi = max(2, k_lo), min(k_hi, x.shape[0] - 1)
    if k_lo > k_hi:
        raise ValueError(f"silhouette needs 2 <= k <= N - 1, got k_range={k_range} for "
                         f"{x.shape[0]} points; use method='eigengap' to allow k = 1")
    scores = {k: silhouette_score(x, kmeans(x, k, seed=seed, **kmeans_kwargs)[0])
              for k in range(k_lo, k_hi + 1)}
    return max(scores, key=scores.get)


def cluster_units(v: torch.Tensor, active: torch.Tensor | None = None, k: int | None = None,
                  k_range: tuple[int, int] = (2, 6), method: str = "silhouette",
                  normalize: bool = True, seed: int = 0, **kmeans_kwargs) -> torch.Tensor:
    """Labels of the time-frequency units of one item, for masks / per-instrument piano rolls.

    ``v [N, D]`` embeddings, ``active [N]`` bool (e.g. note posterior > 0.5; all if None) ->
    ``labels [N]`` in ``0..k-1`` for active units, ``-1`` elsewhere. ``k=None`` estimates it
    (:func:`estimate_num_clusters`). ``normalize``: unit-normalise first (cosine geometry, as
    the deep-clustering loss compares inner products).
    """
    labels = torch.full((v.shape[0],), -1, dtype=torch.long, device=v.device)
    idx = torch.arange(v.shape[0], device=v.device) if active is None else torch.nonzero(
        active.reshape(-1)).flatten()
    if idx.numel() == 0:
        return labels
    x = v.detach()[idx].float()
    if normalize:
        x = F.normalize(x, dim=1)
    if k is None:
        k = estimate_num_clusters(x, k_range, method, seed=seed, **kmeans_kwargs)
    labels[idx] = kmeans(x, min(k, x.shape[0]), seed=seed, **kmeans_kwargs)[0]
    return labels


__all__ = [
    "deep_clustering_loss", "leaky_deep_clustering_loss", "focal_loss", "LossBalancer",
    "linear_attention", "flow_attention", "elu_feature_map", "ClusteringAttention", "kmeans",
    "silhouette_score", "estimate_num_clusters", "cluster_units",
]
