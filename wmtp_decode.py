"""Greedy decoding from an MTPModel: plain (head 0 with a KV cache) or self-speculative.

Self-speculative decoding is blockwise parallel decoding (Stern et al. 2018) as Gloeckle et al.
(2024) run it on their MTP models: one forward over the tokens not yet in the cache runs the
trunk and all H heads, each block with its own layer in one `DynamicCache` (heads attend over
earlier positions too). Head 0's argmax is the next token and heads 1..H-1 propose the H-1 after
it; the next forward feeds [next token, proposals], head 0 verifies them, the longest agreeing
prefix plus head 0's own next token is accepted, and the cache is cropped back to the accepted
tokens. The tokens are exactly plain greedy decoding's; only the number of forwards changes.

Batches are left-padded; a row that accepts fewer proposals than the batch's longest keeps its
rejected slots in the cache, masked out by the attention mask, and every row has its own
position ids, so each row decodes as it would alone.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def greedy_decode(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    speculative: bool = False,
    eos_id: int | None = None,
    stats: dict | None = None,
) -> tuple[list[int], int]:
    """New token ids (through eos_id, at most max_new_tokens) and the forwards made, prefill included.

    A dict passed as `stats` receives `greedy_decode_batch`'s statistics.
    """
    outs, batch_stats = greedy_decode_batch(
        model, [prompt_ids], max_new_tokens, speculative=speculative, eos_id=eos_id
    )
    if stats is not None:
        stats.update(batch_stats)
    return outs[0], batch_stats["forwards"]


@torch.no_grad()
def greedy_decode_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    speculative: bool = False,
    eos_id: int | None = None,
) -> tuple[list[list[int]], dict]:
    """Each prompt's greedy continuation (as `greedy_decode`) and the decoding statistics.

    Statistics: `forwards` (batched forward passes, prefill included), `row_forwards` (the passes
    each row took part in, summed), `tokens` (new tokens returned), `tokens_per_forward` (tokens /
    row_forwards), and for heads 1..H-1 the `proposed` / `accepted` counts of their drafts that
    head 0 verified / accepted and `head_acceptance`, their ratio (head k's draft counts as
    accepted only when heads 1..k-1's were too). Pad slots are masked, so no pad id is needed.
    """
    _check_prompts(model, prompts, max_new_tokens)
    n_heads = model.n_heads if speculative else 1
    device = model.lm_head.weight.device
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    mask = mask.to(device)  # attention mask over the cached and the fed tokens
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    rows = list(range(len(prompts))) if max_new_tokens else []  # original index of live rows
    outs: list[list[int]] = [[] for _ in prompts]
    proposed, accepted = [0] * (n_heads - 1), [0] * (n_heads - 1)
    forwards = row_forwards = 0
    cache = DynamicCache()
    prefill = True
    while rows:
        hidden, ctx = model.run_trunk(
            ids, None if mask.all() else mask, cache=cache, position_ids=position_ids
        )
        forwards += 1
        row_forwards += len(rows)
        n_fed = ids.shape[1]
        z0 = model.run_head(0, hidden, ctx)
        if prefill:  # the prompts' last position (left padding) gives the first new token
            n_ok = torch.zeros(len(rows), dtype=torch.long, device=device)
            at = n_ok + n_fed - 1
            nxt = model.lm_head(z0[:, -1]).argmax(-1)
            keep = mask
        else:  # fed [last token, drafts]: head 0 at j verifies the draft at j+1
            greedy = model.lm_head(z0).argmax(-1)
            n_ok = (greedy[:, :-1] == ids[:, 1:]).long().cumprod(1).sum(1)
            at = n_ok
            nxt = greedy.gather(1, at[:, None])[:, 0]
            for k in range(1, n_fed):
                proposed[k - 1] += len(rows)
                accepted[k - 1] += int((n_ok >= k).sum())
        picked = torch.arange(len(rows), device=device), at
        drafts = [
            model.lm_head(model.run_head(k, hidden, ctx)[picked]).argmax(-1)
            for k in range(1, n_heads)
        ]
        if not prefill:  # every head has appended its K/V: drop the slots no row accepted
            most = int(n_ok.max())
            cache.crop(most + 1 - n_fed)
            valid = torch.arange(most + 1, device=device) <= n_ok[:, None]
            keep = torch.cat([mask[:, :-n_fed], valid], 1)  # a row's rejected slots stay masked
        next_pos = position_ids.gather(1, at[:, None]) + 1

        fed, n_acc, first = ids.tolist(), n_ok.tolist(), nxt.tolist()
        live = [
            i
            for i, r in enumerate(rows)
            if _emit(outs[r], fed[i][1 : 1 + n_acc[i]] + [first[i]], max_new_tokens, eos_id)
        ]
        if not live:
            break
        if len(live) < len(rows):
            idx = torch.tensor(live, device=device)
            cache.batch_select_indices(idx)
            keep, nxt, next_pos = keep[idx], nxt[idx], next_pos[idx]
            drafts = [d[idx] for d in drafts]
            rows = [rows[i] for i in live]
        room = max(max_new_tokens - len(outs[r]) for r in rows)
        n_draft = min(n_heads - 1, room - 1)  # a forward yields at most n_draft + 1 tokens
        ids = torch.stack([nxt, *drafts[:n_draft]], 1)
        position_ids = next_pos + torch.arange(n_draft + 1, device=device)
        mask = torch.cat([keep, torch.ones_like(ids, dtype=torch.bool)], 1)
        prefill = False
    tokens = sum(map(len, outs))
    return outs, {
        "forwards": forwards,
        "row_forwards": row_forwards,
        "tokens": tokens,
        "tokens_per_forward": tokens / max(row_forwards, 1),
        "proposed": proposed,
        "accepted": accepted,
        "head_acceptance": [a / max(p, 1) for a, p in zip(accepted, proposed)],
    }


def _emit(out: list[int], new: list[int], max_new_tokens: int, eos_id: int | None) -> bool:
    """Append new tokens to out, stopping after eos_id or at max_new_tokens; False once done."""
    for tok in new:
        out.append(tok)
        if tok == eos_id or len(out) == max_new_tokens:
            return False
    return True


def _check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise a one-line ValueError on an empty batch, an empty prompt or an id out of the vocab."""
    if not prompts:
        raise ValueError("no prompts to decode")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.lm_head.out_features
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})"
            )
