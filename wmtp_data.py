"""Data, MTP targets, the memory-efficient weighted MTP loss, and the four weightings.

Read top to bottom: datasets -> token ids -> MTP labels -> loss -> weights -> value head.
Every function works on plain tensors; `mtp_loss` only needs a model with `run_trunk`,
`run_head`, `n_heads` and an `lm_head` whose forward takes `fn` (see wmtp_model.MTPModel and
wmtp_model.Unembedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import io_stream

IGNORE = -100  # label of a slot that carries no loss
# CodeContests' Language enum: PYTHON (2) = 1, PYTHON3 = 3; some exports spell them out
PYTHON_LANGUAGES = (1, 3, "PYTHON", "PYTHON3")
KINDS = ("mbpp", "humaneval", "codecontests", "custom", "text")
CHUNK_ELEMENTS = 2**24  # CPU: logits per vocabulary-projection chunk (64 MiB in fp32, cache-sized)
CUDA_CHUNK_SHARE = 32  # CUDA: a chunk's transient buffers take at most 1/32 of device memory
CUDA_CHUNK_ROWS = (1024, 8192)  # CUDA: fewer rows repeat the [V,D] dW accumulation too often

# ---------------------------------------------------------------------------------------------
# Datasets


class Example(NamedTuple):
    """One training example.

    `tests` are Python snippets to run in order after the code (MBPP, HumanEval, custom) or
    `[stdin, expected_stdout]` pairs (CodeContests). `label` is the verifiable reward (1.0 for a
    reference or accepted solution, 0.0 for an incorrect one) or None when the data has none.
    """

    id: str
    prompt: str
    completion: str
    tests: list
    label: float | None = None


def _field(rec: dict, name: str, types: type | tuple[type, ...], where: str):
    """rec[name], checked for presence and type; errors name the file, record and field."""
    if name not in rec:
        raise ValueError(f"{where}: missing field {name!r}")
    value = rec[name]
    if not isinstance(value, types):
        expected = " or ".join(
            t.__name__ for t in (types if isinstance(types, tuple) else (types,))
        )
        raise ValueError(
            f"{where}: field {name!r} is a {type(value).__name__}, expected {expected}"
        )
    return value


def _detect_kind(rec: dict, path: str) -> str:
    """Format of a dataset from the fields of its first record."""
    if "canonical_solution" in rec and "entry_point" in rec:
        return "humaneval"
    if "test_list" in rec and "code" in rec:
        return "mbpp"
    if "solutions" in rec and "description" in rec:
        return "codecontests"
    if "prompt" in rec and "completion" in rec:
        return "custom"
    if "text" in rec:
        return "text"
    raise ValueError(
        f"{path}: record 1: unknown dataset format (fields {sorted(rec)}); expected MBPP, HumanEval, "
        "CodeContests, prompt+completion or text"
    )


def _mbpp(rec: dict, where: str) -> list[Example]:
    """MBPP: the problem statement and its first test as prompt, the reference code as completion."""
    text = _field(rec, "text", str, where)
    code = _field(rec, "code", str, where)
    tests = _field(rec, "test_list", list, where)
    setup = rec.get("test_setup_code") or ""
    challenge = rec.get("challenge_test_list") or []
    prompt = f"{text}\nYour code should pass this test:\n{tests[0]}\n" if tests else f"{text}\n"
    task_id = _field(rec, "task_id", (int, str), where)
    all_tests = ([setup] if setup else []) + list(tests) + list(challenge)
    return [Example(str(task_id), prompt, code.replace("\r\n", "\n"), all_tests, 1.0)]


def _humaneval(rec: dict, where: str) -> list[Example]:
    """HumanEval: signature + docstring as prompt, the canonical body as completion."""
    entry = _field(rec, "entry_point", str, where)
    tests = [_field(rec, "test", str, where), f"check({entry})\n"]
    return [
        Example(
            _field(rec, "task_id", str, where),
            _field(rec, "prompt", str, where),
            _field(rec, "canonical_solution", str, where),
            tests,
            1.0,
        )
    ]


def _io_pairs(rec: dict, name: str, where: str) -> list[list[str]]:
    """[[stdin, stdout], ...] from a CodeContests `{input: [...], output: [...]}` field."""
    tests = rec.get(name) or {"input": [], "output": []}
    if not isinstance(tests, dict):
        raise ValueError(f"{where}: field {name!r} is a {type(tests).__name__}, expected an object")
    inputs = _field(tests, "input", list, f"{where}: {name}")
    outputs = _field(tests, "output", list, f"{where}: {name}")
    if len(inputs) != len(outputs):
        raise ValueError(
            f"{where}: field {name!r} has {len(inputs)} inputs but {len(outputs)} outputs"
        )
    return [[i, o] for i, o in zip(inputs, outputs)]


def _codecontests(rec: dict, where: str) -> list[Example]:
    """CodeContests: one example per Python solution; label 1.0 if accepted, 0.0 if incorrect."""
    name = _field(rec, "name", str, where)
    description = _field(rec, "description", str, where)
    _field(rec, "solutions", dict, where)
    tests = [
        pair
        for f in ("public_tests", "private_tests", "generated_tests")
        for pair in _io_pairs(rec, f, where)
    ]
    prompt = (
        "Solve the following problem in Python. Read from standard input and write to standard output.\n\n"
        f"{description.strip()}\n\nSolution:\n"
    )
    out = []
    for field, label in (("solutions", 1.0), ("incorrect_solutions", 0.0)):
        sols = rec.get(field) or {"language": [], "solution": []}
        if not isinstance(sols, dict):
            raise ValueError(
                f"{where}: field {field!r} is a {type(sols).__name__}, expected an object"
            )
        languages = _field(sols, "language", list, f"{where}: {field}")
        codes = _field(sols, "solution", list, f"{where}: {field}")
        if len(languages) != len(codes):
            raise ValueError(
                f"{where}: field {field!r} has {len(languages)} languages but {len(codes)} solutions"
            )
        for i, (lang, code) in enumerate(zip(languages, codes)):
            if lang in PYTHON_LANGUAGES:
                out.append(
                    Example(f"{name}/{field}/{i}", prompt, code.replace("\r\n", "\n"), tests, label)
                )
    return out


def _custom(rec: dict, where: str, n: int) -> list[Example]:
    """A `prompt` + `completion` record; optional `id`, `tests` and `label`."""
    label = rec.get("label")
    if label is not None and not isinstance(label, (int, float)):
        raise ValueError(f"{where}: field 'label' is a {type(label).__name__}, expected a number")
    return [
        Example(
            str(rec.get("id", n)),
            _field(rec, "prompt", str, where),
            _field(rec, "completion", str, where),
            list(rec.get("tests") or []),
            None if label is None else float(label),
        )
    ]


def _text(rec: dict, where: str, n: int) -> list[Example]:
    """A plain `text` record: all of it is completion (carries loss)."""
    return [Example(str(rec.get("id", n)), "", _field(rec, "text", str, where), [], None)]


def dataset_file(path: str, split: str = "train") -> str:
    """The record file for `path`: itself if it names one, else `{split}.jsonl|.jsonl.gz|.json` inside."""
    if path.lower().endswith((".jsonl", ".jsonl.gz", ".json")):
        return path
    for ext in (".jsonl", ".jsonl.gz", ".json"):
        candidate = io_stream.join(path, split + ext)
        if io_stream.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"{path}: no {split}.jsonl, {split}.jsonl.gz or {split}.json in this folder"
    )


def iter_dataset(path: str, split: str = "train", *, kind: str | None = None) -> Iterator[Example]:
    """Stream Examples from a dataset file or folder, local or S3; the format comes from the first record."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    file = dataset_file(path, split)
    for n, rec in enumerate(io_stream.iter_records(file), 1):
        if kind is None:
            kind = _detect_kind(rec, file)
        where = f"{file}: record {n}"
        if kind == "mbpp":
            yield from _mbpp(rec, where)
        elif kind == "humaneval":
            yield from _humaneval(rec, where)
        elif kind == "codecontests":
            yield from _codecontests(rec, where)
        elif kind == "custom":
            yield from _custom(rec, where, n)
        else:
            yield from _text(rec, where, n)


# ---------------------------------------------------------------------------------------------
# Token ids


def encode(
    tokenizer, example: Example, max_length: int, *, prompt_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """BOS + prompt + completion + EOS as (input_ids, loss_mask, cut); cut = the completion was cut.

    Loss is on completion tokens and EOS (and on the prompt too with `prompt_loss`). A too-long
    example loses prompt tokens from the left first; if the completion alone does not fit, it is
    cut on the right, the EOS is dropped (the text did not end there) and `cut` is True.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    completion = tokenizer.encode(example.completion)
    cut = 1 + len(completion) + 1 > max_length
    room = 0 if cut else max_length - 2 - len(completion)  # prompt tokens that fit
    head = prompt_ids(tokenizer, example.prompt, room)
    if cut:
        completion, tail = completion[: max_length - 1], []
    else:
        tail = [tokenizer.eos_id]
    ids = [*head, *completion, *tail]
    mask = [False] + [prompt_loss] * (len(head) - 1) + [True] * (len(completion) + len(tail))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), cut


def prompt_ids(tokenizer, prompt: str, room: int) -> list[int]:
    """BOS + the prompt's last `room` tokens: how training starts a sequence and generation its input."""
    tokens = tokenizer.encode(prompt) if prompt else []
    return [tokenizer.bos_id, *tokens[max(0, len(tokens) - room) :]]


def collate(batch: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, loss_mask, ...) items to one batch; padding carries no loss."""
    if not batch:
        raise ValueError("collate got an empty batch")
    width = max(len(item[0]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (ids, mask, *_) in enumerate(batch):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


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
) -> tuple[torch.Tensor, torch.Tensor]:
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
    """
    fp32 = {}

    def loss_fn(model, input_ids, attention_mask):
        def project(zs, weight):
            fp32["loss"], fp32["head_ce"] = _mtp_loss(
                zs, weight, labels, weights, chunk_size, denominator
            )
            return fp32["loss"]

        zs = _run_heads(model, input_ids, attention_mask, labels.shape, checkpoint_heads)
        # as lm_head's forward, so that its hooks (FSDP's gather and gradient reduce) fire
        return model.lm_head(zs, fn=project)

    loss = model(input_ids, attention_mask, fn=loss_fn)
    # backward runs through the forward's output, which FSDP may have cast to bf16; the value is
    # the fp32 one computed inside
    return fp32["loss"].detach() + (loss - loss.detach()), fp32["head_ce"]


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
    """The loss and per-head CE from the heads' hidden states and the unembedding weight."""
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
    return loss, head_ce


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


def weight_stats(weights: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean, std, max, entropy (of w/Σw, divided by log n: 1 = uniform) and kept fraction over valid slots."""
    w = weights.detach().float()[labels != IGNORE]
    n = len(w)
    if n == 0:
        return dict.fromkeys(("mean", "std", "max", "entropy", "kept"), math.nan)
    p = w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    entropy = (
        -torch.special.xlogy(p, p).sum() / math.log(n) if n > 1 else torch.ones((), device=w.device)
    )
    stats = torch.stack([w.mean(), w.std(unbiased=False), w.max(), entropy, (w > 0).float().mean()])
    return dict(zip(("mean", "std", "max", "entropy", "kept"), stats.tolist()))


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
