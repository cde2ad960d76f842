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

`compile=True` decodes over a static cache instead (`StaticKV`: preallocated, fixed shapes, each
row's token at position p in slot p) with the per-token / per-draft-verify forward (`decode_step`)
captured by `torch.compile(mode="reduce-overhead")`, i.e. CUDA graphs on a GPU, as gpt-fast does;
the prefill stays eager. The same tokens as the eager path; the first call at a new shape compiles.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache

CACHE_ROUND = 256  # static cache lengths are rounded up to this: fewer shapes, fewer compiles


def greedy_decode(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    speculative: bool = False,
    eos_id: int | None = None,
    stats: dict | None = None,
    compile: bool = False,
) -> tuple[list[int], int]:
    """New token ids (through eos_id, at most max_new_tokens) and the forwards made, prefill included.

    A dict passed as `stats` receives `greedy_decode_batch`'s statistics; `compile` as there.
    """
    outs, batch_stats = greedy_decode_batch(
        model,
        [prompt_ids],
        max_new_tokens,
        speculative=speculative,
        eos_id=eos_id,
        compile=compile,
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
    compile: bool = False,
) -> tuple[list[list[int]], dict]:
    """Each prompt's greedy continuation (as `greedy_decode`) and the decoding statistics.

    Statistics: `forwards` (batched forward passes, prefill included), `row_forwards` (the passes
    each row took part in, summed), `tokens` (new tokens returned), `tokens_per_forward` (tokens /
    row_forwards), and for heads 1..H-1 the `proposed` / `accepted` counts of their drafts that
    head 0 verified / accepted and `head_acceptance`, their ratio (head k's draft counts as
    accepted only when heads 1..k-1's were too). A draft counts only where its row could use it:
    within the row's own max_new_tokens (at most room - 1 drafts, where room tokens are left, as
    a row alone is fed) and not after an EOS the row emits, so every count is the sum of what
    each prompt decoded alone gives. Pad slots are masked, so no pad id is needed.

    compile=True runs `static_decode` with `compiled_step()`: the same tokens and statistics over
    a static cache, every forward after the prefill compiled (finished rows stay in the batch).
    """
    _check_prompts(model, prompts, max_new_tokens)
    if compile:
        return static_decode(model, prompts, max_new_tokens, speculative, eos_id, compiled_step())
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
        picked = torch.arange(len(rows), device=device), at
        drafts = []
        if n_heads > 1:  # one read of the unembedding for all drafting heads
            z = [model.run_head(k, hidden, ctx)[picked] for k in range(1, n_heads)]
            drafts = list(model.lm_head(torch.stack(z, 1)).argmax(-1).unbind(1))
        if not prefill:  # every head has appended its K/V: drop the slots no row accepted
            most = int(n_ok.max())
            cache.crop(most + 1 - n_fed)
            valid = torch.arange(most + 1, device=device) <= n_ok[:, None]
            keep = torch.cat([mask[:, :-n_fed], valid], 1)  # a row's rejected slots stay masked
        next_pos = position_ids.gather(1, at[:, None]) + 1

        fed, n_acc, first = ids.tolist(), n_ok.tolist(), nxt.tolist()
        n_drafts, live = 0 if prefill else n_fed - 1, []
        for i, r in enumerate(rows):
            new = fed[i][1 : 1 + n_acc[i]] + [first[i]]
            room = max_new_tokens - len(outs[r])
            _count_drafts(proposed, accepted, n_drafts, room, new, n_acc[i], eos_id)
            if _emit(outs[r], new, max_new_tokens, eos_id):
                live.append(i)
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
    return outs, decode_stats(outs, forwards, row_forwards, proposed, accepted)


def decode_stats(outs, forwards: int, row_forwards: int, proposed: list, accepted: list) -> dict:
    """The statistics dict `greedy_decode_batch` returns."""
    tokens = sum(map(len, outs))
    return {
        "forwards": forwards,
        "row_forwards": row_forwards,
        "tokens": tokens,
        "tokens_per_forward": tokens / max(row_forwards, 1),
        "proposed": proposed,
        "accepted": accepted,
        "head_acceptance": [a / max(p, 1) for a, p in zip(accepted, proposed)],
    }


class StaticKV:
    """Preallocated keys and values, [B, n_kv_heads, max_len, head_dim] for each trunk and head block.

    A row's token at position p is stored in slot p (`update` scatters at `self.pos`, the fed
    tokens' positions, set before each forward), so the attention mask is causality by position
    alone: rejected drafts are overwritten by the next feed, nothing is cropped or reset, and a
    row may accept more drafts than another. (transformers' StaticCache keeps one write offset
    for the whole batch, so such rows would leave masked holes and need a longer cache.)
    """

    def __init__(self, shape: tuple, n_layers: int, dtype: torch.dtype, device: torch.device):
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_len = shape[2]
        self.pos = torch.zeros(shape[0], 1, dtype=torch.long, device=device)
        for t in self.keys + self.values:  # CUDA graphs replay on these very buffers
            torch._dynamo.mark_static_address(t)

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        """Write the fed tokens' keys and values [B,h,S,d] at their positions; all slots back."""
        where = self.pos[:, None, :, None].expand_as(key)
        self.keys[layer_idx].scatter_(2, where, key)
        self.values[layer_idx].scatter_(2, where, value)
        return self.keys[layer_idx], self.values[layer_idx]


LAST_CACHE: dict = {}  # the last StaticKV by its shapes: reused, so CUDA graphs are not re-recorded


def static_cache(model, batch: int, max_len: int) -> StaticKV:
    """A StaticKV for every block of `model` (plain decoding leaves heads 1..H-1's unused, so both
    modes share one cache), the previous call's one if the shapes match. LAST_CACHE.clear() frees it."""
    cfg, w = model.config, model.lm_head.weight
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, max_len, head_dim)
    n_layers = len(model.layers) + model.n_heads
    key = (shape, n_layers, w.dtype, w.device)
    if key not in LAST_CACHE:
        LAST_CACHE.clear()  # free the old one first
        LAST_CACHE[key] = StaticKV(shape, n_layers, w.dtype, w.device)
    return LAST_CACHE[key]


def decode_step(model, cache: StaticKV, ids, pos, n_heads: int, at=None, one_read=None):
    """One forward of ids [B,S] at positions pos [B,S] over `cache`: the next feed [B,n_heads]
    (head 0's next token, then heads 1..n_heads-1's drafts after it), its positions, and `at` [B].

    at=None verifies: ids are [token, drafts], head 0 at j checks the draft at j+1 and `at` is
    the number accepted; otherwise (the prefill) `at` is the index each row continues from.
    one_read (default: on a GPU) unembeds every head at every fed token in one matmul, one read of
    the unembedding where decoding is bandwidth-bound; else head 0's S rows, then the drafts' H-1.
    """
    cache.pos = pos
    slots = torch.arange(cache.max_len, device=ids.device)
    mask = (slots <= pos[..., None])[:, None]  # [B,1,S,L]; a row's slots above pos are stale
    hidden, ctx = model.run_trunk(ids, mask, cache=cache, position_ids=pos)
    rows = torch.arange(ids.shape[0], device=ids.device)
    z = [model.run_head(k, hidden, ctx) for k in range(n_heads)]
    if at is not None:  # the prefill: every head at the prompt's last token
        nxt = model.lm_head(torch.stack([zk[rows, at] for zk in z], 1)).argmax(-1)
    elif ids.is_cuda if one_read is None else one_read:
        guess = model.lm_head(torch.stack(z, 2)).argmax(-1)  # [B,S,H]
        at = (guess[:, :-1, 0] == ids[:, 1:]).long().cumprod(1).sum(1)
        nxt = guess[rows, at]
    else:
        greedy = model.lm_head(z[0]).argmax(-1)
        at = (greedy[:, :-1] == ids[:, 1:]).long().cumprod(1).sum(1)
        nxt = greedy[rows, at][:, None]
        if n_heads > 1:
            drafts = model.lm_head(torch.stack([zk[rows, at] for zk in z[1:]], 1)).argmax(-1)
            nxt = torch.cat([nxt, drafts], 1)
    # a finished row keeps decoding (fixed shapes) with unused outputs: keep it inside the cache
    nxt_pos = pos[rows, at][:, None] + 1 + torch.arange(n_heads, device=ids.device)
    return nxt, nxt_pos.clamp(max=cache.max_len - 1), at


@functools.cache
def compiled_step():
    """`decode_step` through torch.compile, CUDA graphs on a GPU ("reduce-overhead"), one graph
    per shape (dynamic=False: each batch size, cache length and feed width compiles once)."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


@torch.no_grad()
def static_decode(
    model, prompts: list[list[int]], max_new_tokens: int, speculative: bool, eos_id, step
) -> tuple[list[list[int]], dict]:
    """`greedy_decode_batch` over a StaticKV; `step` (decode_step or compiled_step()) makes every
    forward after the eager prefill. Every forward feeds all H-1 drafts (a fixed shape); only
    those a live row could use count in the statistics, and tokens past max_new_tokens are cut."""
    n_heads = model.n_heads if speculative else 1
    device = model.lm_head.weight.device
    outs: list[list[int]] = [[] for _ in prompts]
    proposed, accepted = [0] * (n_heads - 1), [0] * (n_heads - 1)
    if not max_new_tokens:
        return outs, decode_stats(outs, 0, 0, proposed, accepted)
    width = max(map(len, prompts))
    # a live row feeds positions below width + max_new_tokens - 1 + n_heads (the same for both modes)
    max_len = -(-(width + max_new_tokens + model.n_heads) // CACHE_ROUND) * CACHE_ROUND
    cache = static_cache(model, len(prompts), max_len)
    # right padding: the pads' slots lie above the prompt, masked until decoding overwrites them
    ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], device=device)
    pos = torch.arange(width, device=device).expand(len(prompts), -1)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    ids, pos, n_ok = decode_step(model, cache, ids, pos, n_heads, last)
    forwards, row_forwards = 1, len(prompts)
    live, fed, n_draft = list(range(len(prompts))), None, 0
    while True:
        got = torch.cat([ids, n_ok[:, None]], 1).tolist()  # the one host sync per forward
        still = []
        for i in live:
            new = (fed[i][1 : 1 + got[i][-1]] if fed else []) + got[i][:1]
            room = max_new_tokens - len(outs[i])
            _count_drafts(proposed, accepted, n_draft, room, new, got[i][-1], eos_id)
            if _emit(outs[i], new, max_new_tokens, eos_id):
                still.append(i)
        live = still
        if not live:
            break
        room = max(max_new_tokens - len(outs[i]) for i in live)
        n_draft = min(n_heads - 1, room - 1)  # what the eager path would feed
        fed = [g[:-1] for g in got]
        torch.compiler.cudagraph_mark_step_begin()
        # clones: a CUDA graph's outputs are overwritten by its next replay
        ids, pos, n_ok = (t.clone() for t in step(model, cache, ids, pos, n_heads))
        forwards += 1
        row_forwards += len(live)
    return outs, decode_stats(outs, forwards, row_forwards, proposed, accepted)


def _count_drafts(
    proposed: list, accepted: list, n_fed: int, room: int, new: list, n_ok: int, eos_id
) -> None:
    """Count the drafts of n_fed that a row with room tokens left, emitting new, could use."""
    usable = min(n_fed, room - 1)  # draft room - 1 is the last that saves a forward
    if usable > 1 and eos_id in new[: usable - 1]:  # no draft after an EOS the row emits
        usable = new.index(eos_id) + 1
    for k in range(usable):  # draft k + 1 is accepted when drafts 1..k + 1 all are
        proposed[k] += 1
        accepted[k] += n_ok > k


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
