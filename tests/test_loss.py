"""MTP targets by hand; mtp_loss against the naive full-logits formula in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wmtp_loss import mtp_loss, mtp_targets, rho1_weights
from wmtp_model import init_mtp_model

X = -100
B, S, H, V = 3, 24, 4, 257


def test_mtp_targets_hand_worked():
    # row 0: prompt = positions 0-1, completion 2-4; row 1: completion 1-2, then padding
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert mtp_targets(ids, loss_mask, 3).tolist() == [
        [[X, 7, 8], [7, 8, 9], [8, 9, X], [9, X, X], [X, X, X]],
        [[6, 7, X], [7, X, X], [X, X, X], [X, X, X], [X, X, X]],
    ]


def test_mtp_targets_more_heads_than_positions():
    ids = torch.tensor([[1, 2]])
    assert mtp_targets(ids, torch.ones(1, 2, dtype=torch.bool), 3).tolist() == [
        [[2, X, X], [X, X, X]]
    ]


@pytest.fixture(scope="module")
def model():
    """A tiny random MTP model: 2 trunk blocks + 4 head blocks, vocab 257."""
    return init_mtp_model(vocab_size=V, dim=32, n_layers=6, n_heads=H, n_attn_heads=4, seed=3)


@pytest.fixture(scope="module")
def batch():
    """Three rows, one right-padded, with prompt tokens masked out of the loss."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, 15:] = 0
    ids[1, 15:] = 0
    loss_mask = attention_mask.bool().clone()
    loss_mask[:, :5] = False
    loss_mask[2, :9] = False
    return ids, attention_mask, mtp_targets(ids, loss_mask, H)


def naive_ce(model, ids, attention_mask, labels):
    """Per-slot CE [B,S,H] from the full [B,S,H,V] logits and plain F.cross_entropy (0 where ignored)."""
    logits = model(ids, attention_mask)
    ce = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=X, reduction="none")
    return ce.view(labels.shape)


def naive_loss(model, ids, attention_mask, labels, weights):
    """Σ w·m·CE / Σ w·m computed the obvious way."""
    m = (labels != X).float()
    return (weights * m * naive_ce(model, ids, attention_mask, labels)).sum() / (weights * m).sum()


def grads(model, loss) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of loss."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict):
    """Equal gradients for the same parameters, rtol 1e-4 (atol tiny against each tensor's scale)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=1e-6 * b[name].abs().max().item(), msg=name
        )


def slot_weights(kind: str) -> torch.Tensor | None:
    """None, random positive, or mostly zero weights [B,S,H]."""
    g = torch.Generator().manual_seed(1)
    if kind == "uniform":
        return None
    w = torch.rand(B, S, H, generator=g) * 3
    return w * (torch.rand(B, S, H, generator=g) < 0.2) if kind == "zero-heavy" else w


@pytest.mark.parametrize(("chunk_size", "checkpoint_heads"), [(None, True), (7, True), (7, False)])
@pytest.mark.parametrize("kind", ["uniform", "random", "zero-heavy"])
def test_mtp_loss_equals_naive(model, batch, kind, chunk_size, checkpoint_heads):
    ids, attention_mask, labels = batch
    w = slot_weights(kind)
    expected = naive_loss(
        model, ids, attention_mask, labels, torch.ones(B, S, H) if w is None else w
    )
    expected_grads = grads(model, expected)
    loss, head_ce = mtp_loss(
        model,
        ids,
        labels,
        w,
        attention_mask,
        chunk_size=chunk_size,
        checkpoint_heads=checkpoint_heads,
    )
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    assert_same_grads(grads(model, loss), expected_grads)
    with torch.no_grad():
        ce = naive_ce(model, ids, attention_mask, labels)
    m = labels != X
    expected_head = torch.stack([ce[..., k][m[..., k]].mean() for k in range(H)])
    torch.testing.assert_close(head_ce, expected_head, rtol=1e-5, atol=0)
    assert not head_ce.requires_grad


@pytest.mark.parametrize("mode", ["weighted", "skip"])
def test_weight_function_gets_ce_and_head0_hidden(model, batch, mode):
    ids, attention_mask, labels = batch
    seen = {}

    def weights(ce, hidden):
        seen.update(ce=ce, hidden=hidden)
        return rho1_weights(ce - 5.0, labels, mode=mode, temperature=0.5)

    loss, _ = mtp_loss(model, ids, labels, weights, attention_mask, chunk_size=11)
    got = grads(model, loss)
    ce = naive_ce(model, ids, attention_mask, labels).detach()
    torch.testing.assert_close(seen["ce"], ce, rtol=1e-5, atol=1e-6)
    assert not seen["ce"].requires_grad and not seen["hidden"].requires_grad
    with torch.no_grad():  # head 0's logits are the unembedding of that hidden state
        torch.testing.assert_close(
            model.lm_head(seen["hidden"]), model(ids, attention_mask)[:, :, 0]
        )
    expected_weights = rho1_weights(ce - 5.0, labels, mode=mode, temperature=0.5)
    expected = naive_loss(model, ids, attention_mask, labels, expected_weights)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    assert_same_grads(got, grads(model, expected))


def test_weight_function_without_ce_reads_only_the_hidden_state(model, batch):
    ids, attention_mask, labels = batch
    probe = torch.linspace(-1, 1, model.config.hidden_size)

    def weights(ce, hidden):
        assert ce is None
        return (hidden @ probe).exp()[..., None].expand(-1, -1, H) * (labels != X)

    weights.needs_ce = False
    loss, head_ce = mtp_loss(model, ids, labels, weights, attention_mask, chunk_size=11)
    got = grads(model, loss)
    with torch.no_grad():
        h, ctx = model.run_trunk(ids, attention_mask)
        expected_weights = weights(None, model.run_head(0, h, ctx))
    expected = naive_loss(model, ids, attention_mask, labels, expected_weights)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    assert_same_grads(got, grads(model, expected))
    ce = naive_ce(model, ids, attention_mask, labels).detach()
    m = labels != X
    torch.testing.assert_close(
        head_ce, torch.stack([ce[..., k][m[..., k]].mean() for k in range(H)]), rtol=1e-5, atol=0
    )


def test_no_grad_and_frozen_unembedding(model, batch):
    ids, attention_mask, labels = batch
    w = slot_weights("random")
    with torch.no_grad():
        loss, _ = mtp_loss(model, ids, labels, w, attention_mask)
        expected = naive_loss(model, ids, attention_mask, labels, w)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    model.lm_head.weight.requires_grad_(False)
    try:
        expected_grads = grads(model, naive_loss(model, ids, attention_mask, labels, w))
        got = grads(model, mtp_loss(model, ids, labels, w, attention_mask)[0])
    finally:
        model.lm_head.weight.requires_grad_(True)
    assert "lm_head.weight" not in got
    assert_same_grads(got, expected_grads)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward both dispatch through here)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_never_materialises_full_logits(batch):
    ids, attention_mask, labels = batch
    big_vocab = init_mtp_model(
        vocab_size=4000, dim=32, n_layers=5, n_heads=H, n_attn_heads=4, seed=0
    )
    labels = labels.clamp(max=3999)  # ids < 257 anyway; keep X
    with LargestTensor() as probe:
        loss, _ = mtp_loss(
            big_vocab, ids, labels, slot_weights("random"), attention_mask, chunk_size=8
        )
        loss.backward()
    # nothing as large as one head's [B,S,V] logits (the [V,D] weight gradient is the largest)
    assert probe.numel == 4000 * 32 < B * S * 4000
    with LargestTensor() as probe:
        naive_loss(big_vocab, ids, attention_mask, labels, torch.ones(B, S, H)).backward()
    assert probe.numel >= B * S * H * 4000  # the probe does see the naive path's full logits


def test_bf16_close_to_fp32(model, batch):
    ids, attention_mask, labels = batch
    w = slot_weights("random")
    expected = naive_loss(model, ids, attention_mask, labels, w)
    expected_grads = grads(model, expected)
    low = init_mtp_model(
        vocab_size=V, dim=32, n_layers=6, n_heads=H, n_attn_heads=4, seed=3, dtype=torch.bfloat16
    )
    loss, head_ce = mtp_loss(low, ids, labels, w, attention_mask, chunk_size=16)
    assert loss.dtype == torch.float32 and head_ce.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-2, atol=0)
    got = grads(low, loss)
    for name in ("lm_head.weight", "heads.0.mlp.down_proj.weight", "embed_tokens.weight"):
        assert got[name].dtype == torch.bfloat16
        cos = F.cosine_similarity(
            got[name].float().flatten(), expected_grads[name].flatten(), dim=0
        )
        assert cos > 0.98, name


def test_under_autocast_like_naive(model, batch):
    ids, attention_mask, labels = batch
    w = slot_weights("random")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = mtp_loss(model, ids, labels, w, attention_mask)
        m = (labels != X).float()
        logits = model(ids, attention_mask).float()
    got = grads(model, loss)
    ce = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=X, reduction="none")
    expected = (w * m * ce.view(labels.shape)).sum() / (w * m).sum()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-3, atol=0)
    for name, g in grads(model, expected).items():
        assert F.cosine_similarity(got[name].flatten(), g.flatten(), dim=0) > 0.99, name


def test_bad_inputs(model, batch):
    ids, attention_mask, labels = batch
    with pytest.raises(ValueError, match=r"weights have shape \(3, 24, 2\), labels \(3, 24, 4\)"):
        mtp_loss(model, ids, labels, torch.ones(B, S, 2), attention_mask)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        mtp_loss(model, ids, labels, -torch.ones(B, S, H), attention_mask)
    with pytest.raises(
        ValueError, match=r"labels \(3, 24, 2\) do not fit input_ids \(3, 24\) and 4 heads"
    ):
        mtp_loss(model, ids, labels[..., :2], None, attention_mask)
