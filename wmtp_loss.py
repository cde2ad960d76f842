"""The objective: MTP targets, the memory-efficient weighted MTP loss, the four weightings, the value head.

Read top to bottom against the README's "The objectives, precisely": MTP labels -> loss ->
weights -> value head. Every function works on plain tensors; `mtp_loss` only needs a model with
`run_trunk`, `run_head`, `n_heads` and an `lm_head` whose forward takes `fn` (see
wmtp_model.MTPModel and wmtp_model.Unembedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of a slot that carries no loss
CHUNK_ELEMENTS = 2**24  # CPU: logits per vocabulary-projection chunk (64 MiB in fp32, cache-sized)
CUDA_CHUNK_SHARE = 32  # CUDA: a chunk's transient buffers take at most 1/32 of device memory
CUDA_CHUNK_ROWS = (1024, 8192)  # CUDA: fewer rows repeat the [V,D] dW accumulation too often

# ---------------------------------------------------------------------------------------------
# MTP targets


def mtp_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    n_heads: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """labels[b,t,k] = input_ids[b,t+k+1] where t+k+1 < S and that token carries loss, else -100;
    with an attention_mask, also -100 where position t itself is padding (e.g. left padding)."""
    B, S = input_ids.shape
    labels = torch.full((B, S, n_heads), IGNORE, dtype=torch.long, device=input_ids.device)
    for k in range(n_heads):
        shift = k + 1
        if shift < S:
            target = input_ids[:, shift:]
            labels[:, : S - shift, k] = torch.where(loss_mask[:, shift:].bool(), target, IGNORE)
    if attention_mask is not None:
        labels.masked_fill_(~attention_mask.bool()[:, :, None], IGNORE)
    return labels


# ---------------------------------------------------------------------------------------------
# Loss


def _scaled_softmax_(logits: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Overwrite fp32 logits [N,V] with scale[:,None]·softmax (with exp(logits - rowmax) when
    scale is None) and return their logsumexp [N]. In place, because torch.logsumexp and
    log_softmax take about twice as long on CPU."""
    top = logits.amax(-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(-1)
    if scale is not None:
        logits.mul_((scale / total)[:, None])
    return total.log_().add_(top.squeeze(1))


def default_chunk_rows(
    vocab: int, dim: int, device: torch.device | str, memory: int | None = None
) -> int:
    """Rows per vocabulary-projection chunk of `mtp_loss` (its `chunk_size` default).

    CPU and other devices: CHUNK_ELEMENTS logits, sized for a cache. CUDA: every chunk also adds
    its [V,D] dW product into the fp32 dW, memory-bound work that does not shrink with the rows
    (at V 128256 on an H200, 130 rows a chunk made the loss 2.2x slower than 4096), so a chunk
    gets as many rows as fit: the largest power of two within CUDA_CHUNK_ROWS whose fp32 logits
    and 16-bit copy (6·V bytes a row) plus the 16-bit dW product (2·V·D bytes) take at most
    1/CUDA_CHUNK_SHARE of `memory` (default: the device's).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, CHUNK_ELEMENTS // vocab)
    if memory is None:
        memory = torch.cuda.get_device_properties(device).total_memory
    fit = max(1, (memory // CUDA_CHUNK_SHARE - 2 * vocab * dim) // (6 * vocab))
    low, high = CUDA_CHUNK_ROWS
    return min(high, max(low, 1 << (fit.bit_length() - 1)))


@torch.no_grad()
def _linear_ce(
    z: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 cross-entropy of z @ weight.T against target, and the logits' logsumexp,
    one chunk of rows at a time."""
    ce = torch.empty(len(z), dtype=torch.float32, device=z.device)
    lse = torch.empty_like(ce)
    for s in range(0, len(z), chunk):
        logits = (z[s : s + chunk] @ weight.t()).float()
        target_logit = logits.gather(1, target[s : s + chunk, None]).squeeze(1)
        lse[s : s + chunk] = _scaled_softmax_(logits, None)
        ce[s : s + chunk] = lse[s : s + chunk] - target_logit
    return ce, lse


class _FusedLinearCE(torch.autograd.Function):
    """Σ_k Σ_i w_ki·CE(z_k[i] @ W.T, y_ki), with its gradients computed in forward, chunk by chunk.

    The weights are known in forward, so the softmax of each chunk turns into its gradients at
    once (one matmul for dz, one for dW) and is dropped: no [rows, V] tensor outlives a chunk,
    and backward only scales the stored [rows, D] and [V, D] gradients by the incoming grad.
    """

    @staticmethod
    def forward(ctx, targets, slot_weights, lses, chunk, weight, *zs):
        """`lses`: each row's logsumexp when a CE pass already has it (saves a softmax), else None."""
        dtype, need_w = weight.dtype, ctx.needs_input_grad[4]
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        total = torch.zeros((), dtype=torch.float32, device=weight.device)
        ces, grad_zs = [], []
        for k, (z, y, w) in enumerate(zip(zs, targets, slot_weights)):
            ce = torch.empty(len(z), dtype=torch.float32, device=z.device)
            grad_z = torch.empty_like(z)
            for s in range(0, len(z), chunk):
                zc, yc, wc = z[s : s + chunk], y[s : s + chunk], w[s : s + chunk]
                rows = torch.arange(len(yc), device=zc.device)
                g = (zc @ weight.t()).float()
                target_logit = g[rows, yc]
                if lses is None:
                    lse = _scaled_softmax_(g, wc)
                else:  # w·softmax in one pass: exp(logits - lse + log w), w > 0 on these rows
                    lse = lses[k][s : s + chunk]
                    g.sub_((lse - wc.log())[:, None]).exp_()
                ce[s : s + chunk] = lse - target_logit
                g[rows, yc] -= wc
                g = g.to(dtype)
                grad_z[s : s + chunk] = g @ weight
                if grad_w is None:
                    continue
                if grad_w.dtype == dtype:
                    grad_w.addmm_(g.t(), zc)
                else:  # low-precision model: product in its dtype, sum over chunks in fp32
                    grad_w += g.t() @ zc
            total += (w * ce).sum()
            ces.append(ce)
            grad_zs.append(grad_z)
        ctx.weight_dtype = dtype
        ctx.save_for_backward(grad_w, *grad_zs)
        ce_all = torch.cat(ces)
        ctx.mark_non_differentiable(ce_all)
        return total, ce_all

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_ce):
        grad_w, *grad_zs = ctx.saved_tensors
        dw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        return (None, None, None, None, dw, *(g * grad_total.to(g.dtype) for g in grad_zs))


def mtp_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    checkpoint_heads: bool = True,
    denominator: float | torch.Tensor | None = None,
    details: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Weighted MTP loss Σ w·m·CE / Σ w·m and each head's plain mean CE [H] (detached; nan for a
    head without any target), both in fp32 whatever dtype FSDP's mixed precision gives the
    model's outputs.

    `weights` is None (uniform), a [B,S,H] tensor, or a function called once with the detached
    per-slot CE [B,S,H] and head 0's final normed hidden state [B,S,D] that returns [B,S,H]
    (rho1 and critic weights; this costs one extra CE-only projection pass, which a function
    with the attribute `needs_ce = False` skips: it gets ce=None, as the critic's does). The trunk runs
    once and the heads one after another; the vocabulary projection and fp32 cross-entropy go
    in chunks of `chunk_size` rows, so [B,S,H,V] logits never exist, forward or backward.
    With `checkpoint_heads` each head block is recomputed in backward, so that only one head's
    activations are alive at a time (one extra head-block forward per head).
    `denominator` replaces this batch's Σ w·m: Σ w·m·CE / denominator, so that the gradients of
    several calls (micro-batches, ranks) add up to those of one mean over all of their slots.
    With `details`, also the weights it applied [B,S,H] (0 on invalid slots) and head 0's final
    normed hidden state [B,S,D], both detached: (loss, head_ce, weights, hidden).
    """
    fp32 = {}

    def loss_fn(model, input_ids, attention_mask):
        def project(zs, weight):
            fp32["loss"], fp32["head_ce"], fp32["weights"] = _mtp_loss(
                zs, weight, labels, weights, chunk_size, denominator
            )
            fp32["hidden"] = zs[0].detach()
            return fp32["loss"]

        zs = _run_heads(model, input_ids, attention_mask, labels.shape, checkpoint_heads)
        # as lm_head's forward, so that its hooks (FSDP's gather and gradient reduce) fire
        return model.lm_head(zs, fn=project)

    loss = model(input_ids, attention_mask, fn=loss_fn)
    # backward runs through the forward's output, which FSDP may have cast to bf16; the value is
    # the fp32 one computed inside
    loss = fp32["loss"].detach() + (loss - loss.detach())
    if details:
        return loss, fp32["head_ce"], fp32["weights"].view(labels.shape), fp32["hidden"]
    return loss, fp32["head_ce"]


def _run_heads(model, input_ids, attention_mask, shape, checkpoint_heads) -> list[torch.Tensor]:
    """Every head's final normed hidden state [B,S,D] from one trunk pass."""
    B, S, H = shape
    if (B, S) != tuple(input_ids.shape) or H != model.n_heads:
        raise ValueError(
            f"labels {tuple(shape)} do not fit input_ids {tuple(input_ids.shape)} and {model.n_heads} heads"
        )
    h, ctx = model.run_trunk(input_ids, attention_mask)
    if checkpoint_heads and torch.is_grad_enabled():
        return [checkpoint(model.run_head, k, h, ctx, use_reentrant=False) for k in range(H)]
    return [model.run_head(k, h, ctx) for k in range(H)]


def _mtp_loss(zs, weight, labels, weights, chunk_size, denominator):
    """The loss, per-head CE and applied weights [B*S,H] from the heads' hidden states and the
    unembedding weight."""
    B, S, H = labels.shape
    chunk = chunk_size or default_chunk_rows(*weight.shape, weight.device)
    zs = [z.flatten(0, 1) for z in zs]
    y = labels.view(-1, H)
    valid = y != IGNORE
    ce = torch.zeros(B * S, H, dtype=torch.float32, device=labels.device)
    lse = torch.zeros_like(ce)

    def fill_ce(slots: torch.Tensor) -> None:
        """CE-only pass (no gradients) over the [B*S, H] mask `slots`, written into ce and lse."""
        for k in range(H):
            r = slots[:, k].nonzero().squeeze(1)
            ce[r, k], lse[r, k] = _linear_ce(zs[k][r].detach(), weight.detach(), y[r, k], chunk)

    ce_known = callable(weights) and getattr(weights, "needs_ce", True)
    if ce_known:
        fill_ce(valid)
    if callable(weights):
        weights = weights(ce.view(B, S, H) if ce_known else None, zs[0].detach().view(B, S, -1))
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights have shape {tuple(weights.shape)}, labels {tuple(labels.shape)}")
    w = valid.float() if weights is None else weights.detach().float().reshape(-1, H)
    if (w < 0).any():
        raise ValueError("weights must be >= 0")
    w = w.masked_fill(~valid, 0.0)

    live = w > 0  # slots with a target and a weight: the only ones that need gradients
    if torch.is_grad_enabled() and (weight.requires_grad or any(z.requires_grad for z in zs)):
        rows = [live[:, k].nonzero().squeeze(1) for k in range(H)]
        total, ce_live = _FusedLinearCE.apply(
            [y[r, k] for k, r in enumerate(rows)],
            [w[r, k] for k, r in enumerate(rows)],
            [lse[r, k] for k, r in enumerate(rows)] if ce_known else None,
            chunk,
            weight,
            *(z[r] for z, r in zip(zs, rows)),
        )
        if not ce_known:  # zero-weight slots still count in the per-head CE
            for k, (r, c) in enumerate(zip(rows, ce_live.split([len(r) for r in rows]))):
                ce[r, k] = c
            fill_ce(valid & ~live)
    else:
        if not ce_known:
            fill_ce(valid)
        total = (w * ce).sum()
    if denominator is None:
        denominator = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    loss = total / denominator
    head_ce = ce.sum(0) / valid.sum(0)
    return loss, head_ce, w


# ---------------------------------------------------------------------------------------------
# Weights: each returns [B,S,H], detached, >= 0, zero on invalid slots


def uniform_weights(labels: torch.Tensor) -> torch.Tensor:
    """1 on every slot with a target, 0 elsewhere."""
    return (labels != IGNORE).float()


BISECTION_STEPS = 64  # halvings of the bracket on log c (width log max_weight + range of s/τ)


def _bounded_softmax(
    logits: torch.Tensor, group: torch.Tensor, eps: float, max_weight: float
) -> torch.Tensor:
    """w_i = clip(c_g·n_g·softmax_g(logits)_i, eps, max_weight) for 1-D logits in groups g (ids
    0..G-1) of n_g slots, with c_g such that each group's mean is exactly 1.

    Σ_g clip(c·p) grows monotonically with c from ≤ n_g (c·max p ≤ 1) to ≥ n_g (c·min p ≥
    max_weight), so c_g exists when eps ≤ 1 ≤ max_weight; it is found by bisection on log c_g."""
    n_groups = int(group.max()) + 1

    def per_group(x: torch.Tensor, how: str) -> torch.Tensor:
        out = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, group, x, how, include_self=False)

    n = torch.bincount(group, minlength=n_groups).to(logits.dtype)
    top = per_group(logits, "amax")
    log_p = logits - (top + per_group((logits - top[group]).exp(), "sum").log())[group]
    log_p += n.log()[group]  # n_g·softmax: mean 1 in each group before clipping
    lo, hi = -per_group(log_p, "amax"), math.log(max_weight) - per_group(log_p, "amin")
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        over = per_group((mid[group] + log_p).exp().clamp(eps, max_weight), "sum") > n
        lo, hi = torch.where(over, lo, mid), torch.where(over, mid, hi)
    return ((lo + hi) / 2)[group].add(log_p).exp().clamp(eps, max_weight)


def soft_weights(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    normalize: str,
    eps: float,
    max_weight: float,
    scope: str = "batch",
) -> torch.Tensor:
    """Softmax weights of scores/τ with mean 1 in each group, bounded to [eps, max_weight].

    Groups: the valid heads of each position ("heads"), or the valid slots of the batch
    ("tokens"; of each head with scope "head"). Within a group of n slots the weights are
    clip(c·n·softmax(scores/τ), eps, max_weight) with the one c that makes their mean exactly 1,
    so equal scores give 1 everywhere and the bounds always hold (needs eps ≤ 1 ≤ max_weight).
    """
    if temperature <= 0 or not 0 <= eps <= 1 <= max_weight:
        raise ValueError(
            f"need temperature > 0 and 0 <= eps <= 1 <= max_weight, got {temperature}, {eps}, {max_weight}"
        )
    if normalize not in ("heads", "tokens"):
        raise ValueError(f"normalize must be 'heads' or 'tokens', got {normalize!r}")
    if scope not in ("batch", "head"):
        raise ValueError(f"scope must be 'batch' or 'head', got {scope!r}")
    if normalize == "heads" and scope == "head":
        raise ValueError(
            "normalize='heads' compares the heads of a position: it needs scope='batch'"
        )
    valid = labels != IGNORE
    B, S, H = labels.shape
    if normalize == "heads":
        group = torch.arange(B * S, device=labels.device).view(B, S, 1).expand(B, S, H)
    elif scope == "head":
        group = torch.arange(H, device=labels.device).expand(B, S, H)
    else:
        group = torch.zeros_like(labels)
    w = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if valid.any():
        ids = torch.unique(group[valid], return_inverse=True)[1]
        logits = scores.detach()[valid].double() / temperature
        w[valid] = _bounded_softmax(logits, ids, eps, max_weight).float()
    return w


def critic_weights(
    values: torch.Tensor,
    labels: torch.Tensor,
    *,
    discount: float = 0.95,
    temperature: float = 0.7,
    normalize: str = "heads",
    eps: float = 0.05,
    max_weight: float = 3.0,
) -> torch.Tensor:
    """Soft weights from value deltas δ_t = V_t − discount·V_{t−1} (V_{−1} = 0): s[t,k] = δ[t+k+1]."""
    values = values.detach().float()
    delta = values - discount * F.pad(values[:, :-1], (1, 0))
    B, S, H = labels.shape
    scores = torch.zeros(B, S, H, dtype=torch.float32, device=values.device)
    for k in range(min(H, S - 1)):
        scores[:, : S - k - 1, k] = delta[:, k + 1 :]
    return soft_weights(
        scores, labels, temperature=temperature, normalize=normalize, eps=eps, max_weight=max_weight
    )


@torch.no_grad()
def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """ce[b,j] = CE(logits[b,j], input_ids[b,j+1]) in fp32, 0 at the last position."""
    B, S, _ = logits.shape
    ce = torch.zeros(B, S, dtype=torch.float32, device=logits.device)
    for b in range(B):  # one row at a time bounds the fp32 copy of a reference model's logits
        ce[b, :-1] = F.cross_entropy(logits[b, :-1].float(), input_ids[b, 1:], reduction="none")
    return ce


def rho1_excess(ce_model: torch.Tensor, ref_ce: torch.Tensor) -> torch.Tensor:
    """e[t,k] = ce_model[t,k] − ref_ce[t+k] (the reference's loss on the same token x[t+k+1]); 0 where t+k ≥ S−1."""
    B, S, H = ce_model.shape
    excess = torch.zeros(B, S, H, dtype=torch.float32, device=ce_model.device)
    for k in range(min(H, S - 1)):
        excess[:, : S - k - 1, k] = (
            ce_model[:, : S - k - 1, k].float() - ref_ce[:, k : S - 1].float()
        )
    return excess.detach()


def rho1_weights(
    excess: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str = "weighted",
    temperature: float = 0.7,
    keep_ratio: float = 0.7,
    normalize: str = "tokens",
    eps: float = 0.05,
    max_weight: float = 3.0,
    scope: str = "head",
) -> torch.Tensor:
    """Rho-1 weights: soft weights of the excess loss ("weighted"), or 1 on the top `keep_ratio`
    of valid slots by excess and 0 elsewhere ("skip"; ties go to the earlier slot). Scope "head"
    selects and normalises among each head's slots (head k's excess is larger by construction:
    the reference has seen k more tokens); "batch" among all the batch's slots."""
    if mode == "weighted":
        return soft_weights(
            excess,
            labels,
            temperature=temperature,
            normalize=normalize,
            eps=eps,
            max_weight=max_weight,
            scope=scope,
        )
    if mode != "skip":
        raise ValueError(f"mode must be 'weighted' or 'skip', got {mode!r}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if scope not in ("batch", "head"):
        raise ValueError(f"scope must be 'batch' or 'head', got {scope!r}")
    valid = labels != IGNORE
    head = torch.arange(labels.shape[-1], device=labels.device).expand(labels.shape)
    groups = [valid & (head == k) for k in range(labels.shape[-1])] if scope == "head" else [valid]
    w = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    for mask in groups:
        slots = mask.flatten().nonzero().squeeze(1)
        n_keep = int(keep_ratio * len(slots) + 0.5)  # nearest, halves up
        order = torch.sort(
            excess.detach().flatten()[slots].float(), descending=True, stable=True
        ).indices
        w[slots[order[:n_keep]]] = 1.0
    return w.view(labels.shape)


WEIGHT_STATS = ("mean", "std", "max", "entropy", "kept")


def weight_summary(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """WEIGHT_STATS over the valid slots as one tensor [5], on the weights' device (no host sync):
    mean, std, max, entropy of w/Σw divided by log n (1 = uniform), fraction kept (w > 0); nan
    when no slot is valid."""
    valid = labels != IGNORE
    w = weights.detach().float().masked_fill(~valid, 0.0)
    n = valid.sum().float()
    mean = w.sum() / n
    std = ((w - mean).square().masked_fill(~valid, 0.0).sum() / n).sqrt()
    top = w.masked_fill(~valid, -math.inf).max()
    p = w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    entropy = torch.where(
        n > 1, -torch.special.xlogy(p, p).sum() / n.clamp_min(2).log(), torch.ones_like(n)
    )
    kept = ((w > 0) & valid).sum() / n
    stats = torch.stack([mean, std, top, entropy, kept])
    return torch.where(n > 0, stats, torch.full_like(stats, math.nan))


def weight_stats(weights: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean, std, max, entropy (of w/Σw, divided by log n: 1 = uniform) and kept fraction over valid slots."""
    return dict(zip(WEIGHT_STATS, weight_summary(weights, labels).tolist()))


# ---------------------------------------------------------------------------------------------
# Value head (stage 1)


class ValueHead(nn.Module):
    """MLP dim -> dim/2 -> 1 in fp32 on a final normed hidden state [B,S,D]; returns values [B,S]."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // 2, dtype=torch.float32)
        self.fc2 = nn.Linear(dim // 2, 1, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.fc2(F.gelu(self.fc1(hidden.float()))).squeeze(-1)


def value_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """The tokens the value head is trained on: the loss tokens and the position just before each
    run of them (the last prompt token), whose V is the V_{t−1} in δ of the first completion token."""
    mask = loss_mask.bool()
    return mask | F.pad(mask[:, 1:], (0, 1))


def value_targets(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = gamma^(T−t)·R on valid tokens (T = last valid token of the row), 0 elsewhere."""
    mask = mask.bool()
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, pos, -1).max(dim=1).values
    returns = rewards.float()[:, None] * gamma ** (last[:, None] - pos).clamp_min(0).float()
    return returns.masked_fill(~mask, 0.0)
