"""The objective (wmtp_loss): MTP targets by hand; mtp_loss against the naive full-logits formula in value and gradients; weights, excess loss, value targets and the value head against hand-worked numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import naive_ce, naive_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wmtp_loss import (
    ValueHead,
    critic_weights,
    mtp_loss,
    mtp_targets,
    next_token_ce,
    rho1_excess,
    rho1_weights,
    uniform_weights,
    value_targets,
    weight_stats,
)
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


# ---------------------------------------------------------------------------------------------
# Weights, excess loss, value targets and the value head against hand-worked numbers

# B=1, S=4, H=2: slots (t,k) with t+k+1 < 4 carry a target
LABELS = torch.tensor([[[10, 11], [11, 12], [12, X], [X, X]]])
VALID = LABELS != X


def slots(w: torch.Tensor) -> list[float]:
    """The five valid slots of LABELS in (t,k) order: (0,0) (0,1) (1,0) (1,1) (2,0)."""
    return w[VALID].tolist()


def test_uniform_weights():
    assert uniform_weights(LABELS).tolist() == [[[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]


# values V = [1, 2, 4, 4], discount 0.5: delta = [1, 1.5, 3, 2]; s[t,k] = delta[t+k+1]
# valid scores in slot order: 1.5, 3, 3, 2, 2
VALUES = torch.tensor([[1.0, 2.0, 4.0, 4.0]])


def test_critic_weights_heads():
    # per position softmax times its count of valid heads: t0 2·softmax(1.5, 3), t1 2·softmax(3, 2), t2 [1]
    w = critic_weights(
        VALUES, LABELS, discount=0.5, temperature=1.0, normalize="heads", eps=0.0, max_weight=100.0
    )
    assert slots(w) == pytest.approx([0.364851, 1.635149, 1.462117, 0.537883, 1.0], abs=1e-5)
    assert w[~VALID].eq(0).all()


def test_critic_weights_heads_clipped():
    # the same in [0.4, 1.5], mean 1 per position: t0's 1.635 is capped at 1.5, its other slot
    # takes the rest (0.5); t1 and t2 are inside the bounds
    w = critic_weights(
        VALUES, LABELS, discount=0.5, temperature=1.0, normalize="heads", eps=0.4, max_weight=1.5
    )
    assert slots(w) == pytest.approx([0.5, 1.5, 1.462117, 0.537883, 1.0], abs=1e-5)
    assert w.sum().item() == pytest.approx(5.0)


def test_critic_weights_tokens():
    # softmax over all five slots of [1.5, 3, 3, 2, 2] / 2, then x 5
    w = critic_weights(
        VALUES, LABELS, discount=0.5, temperature=2.0, normalize="tokens", eps=0.0, max_weight=100.0
    )
    assert slots(w) == pytest.approx([0.640857, 1.356695, 1.356695, 0.822877, 0.822877], abs=1e-5)


def test_critic_default_discount_reads_the_delta_of_the_target_token():
    # V = [0, 0, 5, 0], discount 0.95: delta = [0, 0, 5, -4.75]. Slot (1,0) predicts x[2]: score 5;
    # slot (0,1) predicts x[2] too. At a tiny temperature all the weight sits on those two slots.
    values = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    w = critic_weights(
        values, LABELS, temperature=0.01, normalize="tokens", eps=0.0, max_weight=100.0
    )
    assert slots(w) == pytest.approx([0.0, 2.5, 2.5, 0.0, 0.0], abs=1e-5)


# ce_model [1,4,2] and ref_ce [1,4]: e[t,k] = ce[t,k] - ref[t+k], 0 where t+k >= 3
CE_MODEL = torch.tensor([[[2.0, 2.5], [1.0, 3.0], [0.5, 0.7], [9.0, 9.0]]])
REF_CE = torch.tensor([[0.5, 1.0, 0.25, 0.0]])


def test_rho1_excess_alignment():
    e = rho1_excess(CE_MODEL, REF_CE)
    assert e.tolist() == [[[1.5, 1.5], [0.0, 2.75], [0.25, 0.0], [0.0, 0.0]]]


def test_next_token_ce_hand_worked():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 0] = 2.0  # target x[1] = 0: CE = log(e^2 + 3) - 2
    ids = torch.tensor([[3, 0, 1]])
    assert next_token_ce(logits, ids)[0].tolist() == pytest.approx(
        [0.340753, math.log(4), 0.0], abs=1e-5
    )


def test_oracle_reference_has_zero_excess_baseline():
    # a reference that puts all its mass on the true next token has CE ~ 0 wherever a next token exists
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (2, 6))
    logits = torch.zeros(2, 6, 7)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 60.0)
    ref_ce = next_token_ce(logits, ids)
    assert ref_ce.abs().max() < 1e-20
    ce_model = torch.rand(2, 6, 3)
    e = rho1_excess(ce_model, ref_ce)
    t, k = torch.meshgrid(torch.arange(6), torch.arange(3), indexing="ij")
    inside = (t + k < 5).expand(2, 6, 3)
    torch.testing.assert_close(e[inside], ce_model[inside])
    assert e[~inside].eq(0).all()


def test_rho1_weighted_tokens_and_heads():
    e = rho1_excess(CE_MODEL, REF_CE)  # valid slots: 1.5, 1.5, 0.0, 2.75, 0.25
    kw = dict(temperature=1.0, scope="batch")
    w = rho1_weights(e, LABELS, normalize="tokens", eps=0.0, max_weight=100.0, **kw)
    assert slots(w) == pytest.approx([0.833336, 0.833336, 0.185942, 2.90863, 0.238755], abs=1e-5)
    # capped at 2: the other four share the remaining 3 in proportion (x 3/2.091369)
    w = rho1_weights(e, LABELS, normalize="tokens", eps=0.05, max_weight=2.0, **kw)
    assert slots(w) == pytest.approx([1.195393, 1.195393, 0.266728, 2.0, 0.342486], abs=1e-5)
    # per position: t0 2·softmax(1.5, 1.5), t1 2·softmax(0, 2.75), t2 [1]
    w = rho1_weights(e, LABELS, normalize="heads", eps=0.0, max_weight=100.0, **kw)
    assert slots(w) == pytest.approx([1.0, 1.0, 0.120173, 1.879827, 1.0], abs=1e-5)
    assert w[~VALID].eq(0).all()


def test_rho1_skip_top_of_batch_with_ties_and_padding():
    # row 0 as LABELS; row 1 is padding except slot (0,0). Invalid slots have big excess that must not count.
    labels = torch.stack([LABELS[0], torch.tensor([[5, X], [X, X], [X, X], [X, X]])])
    excess = torch.tensor(
        [
            [[2.0, 1.0], [1.0, -1.0], [1.0, 9.0], [9.0, 9.0]],
            [[3.0, 9.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],
        ]
    )
    # 6 valid slots; keep 0.5 -> 3: 3.0 (row 1), 2.0, then the earliest of the tied 1.0s: (0,1) of row 0
    w = rho1_weights(excess, labels, mode="skip", keep_ratio=0.5, scope="batch")
    assert w.tolist() == [
        [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    ]
    # keep 0.7 of 6 = 4.2 -> 4 slots
    assert rho1_weights(excess, labels, mode="skip", keep_ratio=0.7, scope="batch").sum() == 4
    assert (
        rho1_weights(excess, labels, mode="skip", keep_ratio=1.0).tolist()
        == (labels != X).float().tolist()
    )


def test_weights_are_detached_nonnegative_and_zero_on_invalid():
    torch.manual_seed(1)
    labels = torch.randint(0, 5, (3, 8, 4)).masked_fill(torch.rand(3, 8, 4) < 0.4, X)
    values = torch.randn(3, 8, requires_grad=True)
    excess = torch.randn(3, 8, 4, requires_grad=True)
    for w in (
        uniform_weights(labels),
        critic_weights(values, labels),
        critic_weights(values, labels, normalize="tokens"),
        rho1_weights(excess, labels),
        rho1_weights(excess, labels, normalize="heads", scope="batch"),
        rho1_weights(excess, labels, mode="skip"),
    ):
        assert not w.requires_grad
        assert w.shape == labels.shape and (w >= 0).all() and w[labels == X].eq(0).all()


def test_bad_weight_arguments():
    with pytest.raises(ValueError, match="normalize must be 'heads' or 'tokens'"):
        critic_weights(VALUES, LABELS, normalize="batch")
    with pytest.raises(ValueError, match="need temperature > 0"):
        rho1_weights(CE_MODEL, LABELS, temperature=0.0)
    with pytest.raises(ValueError, match="mode must be 'weighted' or 'skip'"):
        rho1_weights(CE_MODEL, LABELS, mode="top")
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        rho1_weights(CE_MODEL, LABELS, mode="skip", keep_ratio=0.0)


def test_weight_stats():
    labels = torch.tensor([[[1, 1], [1, 1], [X, X]]])
    weights = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]]])
    # p = [.25, .25, 0, .5]: entropy 1.0397 nats / log 4 = 0.75
    assert weight_stats(weights, labels) == pytest.approx(
        {"mean": 1.0, "std": math.sqrt(0.5), "max": 2.0, "entropy": 0.75, "kept": 0.75}
    )


def test_value_targets():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert value_targets(rewards, mask, gamma=0.5).tolist() == [
        [0.25, 0.5, 1.0, 0.0],
        [0.0, 0.5, 1.0, 2.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    assert value_targets(rewards[:1], mask[:1]).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_value_head_shape_and_fp32():
    head = ValueHead(8)
    assert head.fc1.weight.shape == (4, 8) and head.fc2.weight.shape == (1, 4)
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (2, 5) and values.dtype == torch.float32
    with torch.no_grad():  # an independent evaluation of the MLP
        expected = (
            torch.nn.functional.gelu(hidden.float() @ head.fc1.weight.T + head.fc1.bias)
            @ head.fc2.weight.T
        )
        torch.testing.assert_close(values, (expected + head.fc2.bias).squeeze(-1))
