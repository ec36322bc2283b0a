"""Deep-clustering losses, focal loss, loss balancer, clustering attention and k-means against
slow, obviously correct versions."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from modules.models.clustering import (ClusteringAttention, LossBalancer, cluster_units,
                                deep_clustering_loss, estimate_num_clusters, flow_attention,
                                focal_loss, kmeans, leaky_deep_clustering_loss, linear_attention)

F64 = torch.float64


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and
    backward), to show that an N x N matrix is never formed."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def note(t):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
            return t

        tree_map(note, out)
        self.ops += 1
        return out


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# deep clustering
# --------------------------------------------------------------------------------------------

def naive_dc(v, y, w=None, slope=None, norm="active"):
    """The definition: the full N x N affinity matrices, pair (i, j) weighted by (w_i w_j)^2."""
    sim = v @ v.transpose(1, 2)
    if slope is not None:
        sim = F.leaky_relu(sim, slope)
    diff = sim - y @ y.transpose(1, 2)
    if w is not None:
        diff = diff * (w.unsqueeze(2) * w.unsqueeze(1))
    loss = diff.pow(2).sum((1, 2))
    n = v.shape[1]
    if norm == "all" or (norm == "active" and w is None):
        return loss / n ** 2
    if norm == "active":
        return loss / w.pow(2).sum(-1).pow(2)
    return loss


def dc_inputs(b=3, n=37, d=5, c=3, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, n, d, generator=g, dtype=F64), dim=-1)
    labels = torch.randint(c, (b, n), generator=g)
    y = torch.rand(b, n, c, generator=g, dtype=F64).softmax(-1) if soft else \
        F.one_hot(labels, c).to(F64)
    w = torch.rand(b, n, generator=g, dtype=F64)
    w[:, -5:] = 0  # padding
    w[0, 3:9] = 0  # silence
    return v, y, w, labels


@pytest.mark.parametrize("norm", ["active", "all", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_dc_losses_match_naive_values_and_gradients(norm, weighted, soft):
    v, y, w, _ = dc_inputs(soft=soft)  # batch 3, N 37, D 5 != C 3
    w = w if weighted else None
    cases = [(deep_clustering_loss, {}, None)] + [
        (leaky_deep_clustering_loss, {"chunk_size": cs}, 0.3) for cs in (1, 8, 100)]
    for fn, kwargs, slope in cases:
        inputs = [t.clone().requires_grad_() for t in (v, y) + ((w,) if weighted else ())]
        ours = fn(inputs[0], inputs[1], inputs[2] if weighted else None, norm=norm, **kwargs)
        ref_in = [t.clone().requires_grad_() for t in inputs]
        ref = naive_dc(ref_in[0], ref_in[1], ref_in[2] if weighted else None, slope, norm)
        assert ours.shape == (3,)
        assert rel_err(ours, ref) <= 1e-8, (fn.__name__, kwargs)
        probe = torch.tensor([1.0, -0.7, 2.3], dtype=F64)  # distinct upstream grad per item
        ours_g = torch.autograd.grad((ours * probe).sum(), inputs)
        ref_g = torch.autograd.grad((ref * probe).sum(), ref_in)
        for name, a, b in zip("vyw", ours_g, ref_g):
            assert rel_err(a, b) <= 1e-8, (fn.__name__, kwargs, name)


def test_leaky_slope_one_equals_plain_dc_and_leaky_relaxes_negatives():
    v, y, w, _ = dc_inputs()
    plain = deep_clustering_loss(v, y, w)
    assert rel_err(leaky_deep_clustering_loss(v, y, w, negative_slope=1.0), plain) <= 1e-10
    assert (leaky_deep_clustering_loss(v, y, w, negative_slope=0.3) < plain).all()


def test_leaky_dc_passes_gradcheck():
    v, y, w, _ = dc_inputs(b=2, n=9, d=3, c=2, soft=True)
    v, y = v.requires_grad_(), y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: leaky_deep_clustering_loss(a, b, w, chunk_size=4), (v, y))


def test_dc_integer_labels_padding_and_perfect_embedding():
    v, y, w, labels = dc_inputs()
    for fn in (deep_clustering_loss, leaky_deep_clustering_loss):
        assert rel_err(fn(v, labels, w), fn(v, y, w)) <= 1e-12
    # 'active': appending padded units (weight 0) changes nothing
    pad_v = torch.cat([v, torch.randn(3, 20, 5, dtype=F64)], 1)
    pad_y = torch.cat([y, F.one_hot(torch.zeros(3, 20, dtype=torch.long), 3).to(F64)], 1)
    pad_w = torch.cat([w, torch.zeros(3, 20, dtype=F64)], 1)
    for fn in (deep_clustering_loss, leaky_deep_clustering_loss):
        assert rel_err(fn(pad_v, pad_y, pad_w), fn(v, y, w)) <= 1e-12
    # embeddings equal to the one-hot assignments: zero loss
    assert deep_clustering_loss(y, y, w).abs().max() < 1e-12
    assert leaky_deep_clustering_loss(y, y, w).abs().max() < 1e-12


def test_dc_losses_never_form_the_n_by_n_matrix():
    b, n, d, c, chunk = 2, 2000, 20, 2, 250
    v = torch.randn(b, n, d, requires_grad=True)
    y = F.one_hot(torch.randint(c, (b, n)), c).float()
    w = torch.rand(b, n)
    with LargestTensor() as low_rank:
        deep_clustering_loss(v, y, w).sum().backward()
    with LargestTensor() as chunked:
        leaky_deep_clustering_loss(v, y, w, chunk_size=chunk).sum().backward()
    assert low_rank.largest <= b * n * d
    # the inputs / their gradients, or one chunk x chunk block; the naive form needs b * n * n
    assert chunked.largest <= max(b * n * d, b * chunk * chunk)


def test_dc_bad_input_messages():
    v, y, w, _ = dc_inputs()
    with pytest.raises(ValueError, match=r"\[batch, N, D\]"):
        deep_clustering_loss(v[0], y)
    with pytest.raises(ValueError, match="weights must be"):
        deep_clustering_loss(v, y, w[:, :5])
    with pytest.raises(ValueError, match="norm must be"):
        deep_clustering_loss(v, y, norm="mean")


# --------------------------------------------------------------------------------------------
# focal loss
# --------------------------------------------------------------------------------------------

def naive_focal(x, t, alpha, gamma):
    p = torch.sigmoid(x)
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    return -(a_pos * t * (1 - p) ** gamma * torch.log(p)
             + a_neg * (1 - t) * p ** gamma * torch.log(1 - p))


@pytest.mark.parametrize("alpha,gamma", [(None, 2.0), (0.25, 2.0), (0.8, 0.5), (None, 0.0)])
def test_focal_matches_formula_with_padding(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(2, 88, 50, generator=g, dtype=F64)
    t = (torch.rand(2, 88, 50, generator=g, dtype=F64) < 0.1).to(F64)
    mask = torch.ones(2, 1, 50, dtype=F64)
    mask[1, :, 30:] = 0  # item 1 padded after frame 30
    ours = focal_loss(x, t, alpha, gamma, mask=mask)
    elem = naive_focal(x, t, alpha, gamma)
    ref = torch.stack([elem[0].mean(), elem[1, :, :30].mean()])
    assert rel_err(ours, ref) <= 1e-10
    assert rel_err(focal_loss(x, t, alpha, gamma, reduction="none")[1, :, :30],
                   elem[1, :, :30]) <= 1e-10


def test_focal_gamma0_no_alpha_is_bce_and_is_stable():
    g = torch.Generator().manual_seed(2)
    x = 4 * torch.randn(3, 20, 30, generator=g)
    t = torch.rand(3, 20, 30, generator=g)  # soft targets too
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").flatten(1).mean(-1)
    assert torch.allclose(focal_loss(x, t, alpha=None, gamma=0.0), bce, atol=1e-6)
    big = torch.tensor([[-200.0, 200.0, 0.0]], requires_grad=True)
    out = focal_loss(big, torch.tensor([[1.0, 0.0, 1.0]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()


# --------------------------------------------------------------------------------------------
# loss balancer
# --------------------------------------------------------------------------------------------

STEPS = [(2.0, 0.5), (1.0, 0.4), (0.8, 0.35), (0.5, 0.3)]


def test_balancer_harmonic_iir_and_dwa_by_hand():
    bal = LossBalancer(2, harmonic=True, beta=0.5, dwa=True, temperature=2.0)
    # alpha_new = H / L with H = 1 / (1/L1 + 1/L2); alpha = 0.5 alpha + 0.5 alpha_new
    a1 = (0.4 / 2.0, 0.4 / 0.5)                                   # H = 0.4
    h2 = 1 / (1 / 1.0 + 1 / 0.4)
    a2 = (0.5 * a1[0] + 0.5 * h2 / 1.0, 0.5 * a1[1] + 0.5 * h2 / 0.4)
    h3 = 1 / (1 / 0.8 + 1 / 0.35)
    a3 = (0.5 * a2[0] + 0.5 * h3 / 0.8, 0.5 * a2[1] + 0.5 * h3 / 0.35)
    h4 = 1 / (1 / 0.5 + 1 / 0.3)
    a4 = (0.5 * a3[0] + 0.5 * h4 / 0.5, 0.5 * a3[1] + 0.5 * h4 / 0.3)
    # DWA: w = 2 softmax(r / 2), r = L(t-1) / L(t-2); ones for the first two steps
    e3 = (math.exp(1.0 / 2.0 / 2), math.exp(0.4 / 0.5 / 2))
    w3 = (2 * e3[0] / sum(e3), 2 * e3[1] / sum(e3))
    e4 = (math.exp(0.8 / 1.0 / 2), math.exp(0.35 / 0.4 / 2))
    w4 = (2 * e4[0] / sum(e4), 2 * e4[1] / sum(e4))
    expected = [a1, a2, (a3[0] * w3[0], a3[1] * w3[1]), (a4[0] * w4[0], a4[1] * w4[1])]
    for losses, want in zip(STEPS, expected):
        tensors = [torch.tensor(v, dtype=F64, requires_grad=True) for v in losses]
        total, weights = bal(tensors)
        assert weights.tolist() == pytest.approx(want, rel=1e-12)
        assert total.item() == pytest.approx(want[0] * losses[0] + want[1] * losses[1], rel=1e-12)
        total.backward()
        assert [t.grad.item() for t in tensors] == pytest.approx(want, rel=1e-12)
    # first step of pure harmonic normalisation: every weighted loss equals H
    total, weights = LossBalancer(3, dwa=False)([torch.tensor(x) for x in (4.0, 0.1, 2.0)])
    h = 1 / (1 / 4.0 + 1 / 0.1 + 1 / 2.0)
    assert (weights * torch.tensor([4.0, 0.1, 2.0])).tolist() == pytest.approx([h] * 3, rel=1e-6)
    assert total.item() == pytest.approx(3 * h, rel=1e-6)


def test_balancer_eval_mode_leaves_the_state_and_the_state_restores():
    bal = LossBalancer(2, harmonic=False, dwa=True, temperature=1.0)
    for losses in [(3.0, 1.0), (1.5, 0.75)]:
        assert bal([torch.tensor(x) for x in losses])[1].tolist() == [1.0, 1.0]
    e = (math.exp(1.5 / 3.0), math.exp(0.75 / 1.0))
    want = [2 * e[0] / sum(e), 2 * e[1] / sum(e)]
    state = {k: v.clone() for k, v in bal.state_dict().items()}
    bal.eval()
    assert bal([torch.tensor(9.0), torch.tensor(0.1)])[1].tolist() == pytest.approx(want)
    assert all(torch.equal(v, state[k]) for k, v in bal.state_dict().items())
    bal.train()
    bal([torch.tensor(9.0), torch.tensor(0.1)])  # a training step moves the history
    assert not torch.equal(bal.history, state["history"])
    bal.load_state_dict(state)
    assert bal([torch.tensor(1.0), torch.tensor(1.0)])[1].tolist() == pytest.approx(want)


def test_balancer_state_dict_round_trip():
    a = LossBalancer(2, beta=0.7, temperature=1.5)
    for losses in STEPS[:3]:
        a([torch.tensor(x) for x in losses])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = LossBalancer(2, beta=0.7, temperature=1.5)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for losses in STEPS[3:] + STEPS[:2]:
        ta, wa = a([torch.tensor(x) for x in losses])
        tb, wb = b([torch.tensor(x) for x in losses])
        assert torch.equal(wa, wb) and torch.equal(ta, tb)
    with pytest.raises(ValueError, match="positive losses"):
        a([torch.tensor(-1.0), torch.tensor(1.0)])


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

def naive_linear(q, k, v, w=None):
    """Quadratic form: A_ij = w_j q_i.k_j / sum_l w_l q_i.k_l, out = A v."""
    a = q @ k.transpose(-1, -2)
    if w is not None:
        a = a * w[:, None, None, :]
    return (a / a.sum(-1, keepdim=True)) @ v


def naive_flowformer(q, k, v):
    """Flowformer's equations with plain sums over units and the explicit N x N flow matrix."""
    n = q.shape[2]
    flow = q @ k.transpose(-1, -2)                              # [b, h, sink i, source j]
    incoming, outgoing = flow.sum(-1), flow.sum(-2)             # I_i, O_j
    conserved_in = (flow / outgoing.unsqueeze(-2)).sum(-1)      # sources with unit outflow
    conserved_out = (flow / incoming.unsqueeze(-1)).sum(-2)     # sinks with unit inflow
    competition = torch.softmax(conserved_out, -1) * n
    allocation = torch.sigmoid(conserved_in * n / n)
    return allocation.unsqueeze(-1) * ((flow / incoming.unsqueeze(-1))
                                       @ (competition.unsqueeze(-1) * v))


def attn_inputs(b=2, h=3, n=40, d=4, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.sigmoid(torch.randn(b, h, n, d, generator=g, dtype=F64)) for _ in range(2))
    v = torch.randn(b, h, n, e, generator=g, dtype=F64)
    w = torch.rand(b, n, generator=g, dtype=F64)
    w[:, ::4] = 0
    return q, k, v, w


def test_linear_attention_matches_quadratic_formula():
    q, k, v, w = attn_inputs()
    assert rel_err(linear_attention(q, k, v, eps=0), naive_linear(q, k, v)) <= 1e-10
    assert rel_err(linear_attention(q, k, v, w, eps=0), naive_linear(q, k, v, w)) <= 1e-10


def test_flow_attention_matches_flowformer_equations_and_weights_are_a_measure():
    q, k, v, w = attn_inputs()
    assert rel_err(flow_attention(q, k, v, eps=0), naive_flowformer(q, k, v)) <= 1e-10
    ones = torch.ones(2, 40, dtype=F64)
    assert rel_err(flow_attention(q, k, v, ones, eps=0), naive_flowformer(q, k, v)) <= 1e-10
    # only the relative weights matter (they are normalised by their sum)
    assert rel_err(flow_attention(q, k, v, 7 * w, eps=0), flow_attention(q, k, v, w, eps=0)) \
        <= 1e-10
    # all-zero weights: empty memory, finite output
    assert torch.isfinite(flow_attention(q, k, v, torch.zeros_like(w))).all()


@pytest.mark.parametrize("kind", ["flow", "linear"])
def test_clustering_attention_shapes_and_zero_weight_units(kind):
    torch.manual_seed(0)
    layer = ClusteringAttention(8, heads=2, kind=kind).double()
    x = torch.randn(2, 8, 6, 7, dtype=F64)
    w = torch.rand(2, 6, 7, dtype=F64)
    w[:, 2] = 0  # pitch row 2 silent
    y = layer(x, w)
    assert y.shape == x.shape and layer(x.flatten(2)).shape == (2, 8, 42)
    assert torch.equal(layer(x.flatten(2), w.flatten(1)), y.flatten(2))
    # units of weight 0: whatever they hold, the others' outputs do not change
    x2 = x.clone()
    x2[:, :, 2] = 50 * torch.randn(2, 8, 7, dtype=F64)
    y2 = layer(x2, w)
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    assert torch.allclose(y2[:, :, keep], y[:, :, keep], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, :, 2], y[:, :, 2])  # they still read from the memory
    # without weights, every unit influences the others
    assert not torch.allclose(layer(x2)[:, :, keep], layer(x)[:, :, keep])


def test_clustering_attention_linear_kind_matches_quadratic_formula():
    torch.manual_seed(1)
    layer = ClusteringAttention(8, heads=2, kind="linear", eps=0).double()
    x = torch.randn(2, 8, 30, dtype=F64)
    w = torch.rand(2, 30, dtype=F64)

    def heads(t):
        return t.view(2, 2, 4, 30).transpose(2, 3)

    q = F.elu(heads(layer.conv_q(x))) + 1
    k = F.elu(heads(layer.conv_k(x))) + 1
    v = heads(layer.conv_v(x))
    for weights in (None, w):
        att = naive_linear(q, k, v, weights).transpose(2, 3).reshape(2, 8, 30)
        assert rel_err(layer(x, weights), x + layer.conv_out(att)) <= 1e-10


@pytest.mark.parametrize("kind", ["flow", "linear"])
def test_clustering_attention_is_linear_in_units(kind):
    n = 20000  # an N x N matrix would hold 4e8 elements (1.6 GB in float32) per head
    layer = ClusteringAttention(16, heads=4, kind=kind)
    x = torch.randn(1, 16, 100, n // 100, requires_grad=True)
    w = torch.rand(1, 100, n // 100)
    with LargestTensor() as rec:
        layer(x, w).sum().backward()
    assert rec.largest <= 16 * n  # nothing bigger than the input itself
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------

def blobs(k=3, per=150, d=5, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(per)
    return centres[labels] + spread * torch.randn(k * per, d, generator=g), labels


def same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_blobs_deterministically():
    x, truth = blobs()
    labels, centroids, inertia = kmeans(x, 3, seed=0)
    assert same_partition(labels, truth) and centroids.shape == (3, 5)
    assert inertia == pytest.approx(float(((x - centroids[labels]) ** 2).sum()), rel=1e-5)
    again = kmeans(x, 3, seed=0)
    assert torch.equal(again[0], labels) and torch.equal(again[1], centroids)
    assert same_partition(kmeans(x, 3, seed=5, n_init=1)[0], truth)
    assert kmeans(x[:4], 4)[2] == pytest.approx(0.0, abs=1e-9)


def test_estimate_num_clusters():
    for k in (2, 3, 5):
        x, _ = blobs(k=k, d=8, seed=k)  # eigengap needs k < D
        assert estimate_num_clusters(x, (2, 7)) == k
        assert estimate_num_clusters(x, (1, 7), method="eigengap") == k
    # deep-clustering-like embeddings: unit vectors around K orthogonal directions
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        dirs = torch.eye(20)[:k]
        v = F.normalize(dirs[torch.randint(k, (3000,), generator=g)]
                        + 0.1 * torch.randn(3000, 20, generator=g), dim=1)
        assert estimate_num_clusters(v, (1, 6), method="eigengap") == k


def test_cluster_units_labels_active_units_only():
    x, truth = blobs(k=2, per=100)
    active = torch.rand(200, generator=torch.Generator().manual_seed(3)) > 0.3
    labels = cluster_units(x, active, normalize=False)
    assert (labels[~active] == -1).all()
    assert same_partition(labels[active], truth[active])
    assert (cluster_units(x, torch.zeros(200, dtype=torch.bool)) == -1).all()
