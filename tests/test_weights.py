"""Weights, excess loss, value targets and the value head against hand-worked numbers."""

import math

import pytest
import torch

from wmtp_loss import (
    ValueHead,
    critic_weights,
    next_token_ce,
    rho1_excess,
    rho1_weights,
    uniform_weights,
    value_targets,
    weight_stats,
)

X = -100
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
