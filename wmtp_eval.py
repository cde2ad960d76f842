"""Evaluation: completions from head 0, programs checked in the sandbox (wmtp_sandbox), pass@k
(wmtp_stats).

Read top to bottom: problems and programs -> `generate` -> `score` -> `evaluate` (all of it for
one dataset) -> the trainer's periodic greedy pass@1.
"""

from __future__ import annotations

import copy
import functools
import os
import queue
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, NamedTuple

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    StopStringCriteria,
)

import io_stream
from wmtp_data import dataset_file, iter_dataset, prompt_ids
from wmtp_decode import greedy_decode, greedy_decode_batch  # noqa: F401 (greedy_decode re-exported)
from wmtp_model import MTPModel, Tokenizer, kit_key
from wmtp_sandbox import check_program, start_sandbox, stop_sandbox
from wmtp_stats import pass_at_k

if TYPE_CHECKING:
    from wmtp import Config

# Stop sequences (a completion is cut at the first one). HumanEval completes a function body, so
# a new top-level statement ends it (Chen et al. 2021); an MBPP completion is a whole program
# that may define helpers and classes, so only test or script code ends it.
STOP = {
    "humaneval": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#"),
    "mbpp": ("\nassert ", "\nprint(", "\nif __name__", "\n```"),
}

# ---------------------------------------------------------------------------------------------
# Problems and programs


class Problem(NamedTuple):
    """One evaluation problem: what the model sees, and the code around its completion."""

    id: str
    prompt: str  # the model's input after BOS (training's prompt for the same record)
    head: str  # code before the completion (HumanEval: the prompt; MBPP: nothing)
    tests: str  # code after the completion
    reference: str  # the dataset's own solution, a completion that must pass


def program(problem: Problem, completion: str) -> str:
    """The program that checks a completion: head + completion + tests."""
    return problem.head + completion + problem.tests


def load_problems(path: str, split: str = "test", limit: int | None = None) -> tuple[str, list]:
    """(kind, problems) of a HumanEval or MBPP dataset file or folder, local or S3.

    HumanEval: program = prompt + completion + test + check(entry_point). MBPP: program =
    completion + test_setup_code + test_list (the challenge tests are not run). Prompts come
    from `iter_dataset`, as training builds them.
    """
    file = dataset_file(path, split)
    kind, problems = None, []
    records = io_stream.iter_records(file)
    for n, (rec, ex) in enumerate(zip(records, iter_dataset(file, split)), 1):
        if kind is None:
            if "entry_point" in rec and "test" in rec:
                kind = "humaneval"
            elif "test_list" in rec:
                kind = "mbpp"
            else:
                raise ValueError(
                    f"{file}: record 1: evaluation needs HumanEval (prompt, test, entry_point) "
                    f"or MBPP (text, code, test_list) records, not fields {sorted(rec)}"
                )
        if kind == "humaneval":
            head, tests = rec["prompt"], f"\n{rec['test']}\ncheck({rec['entry_point']})\n"
        else:
            setup = (rec.get("test_setup_code") or "").replace("\r\n", "\n")
            tests = "\n" + setup + "\n" + "\n".join(rec["test_list"]) + "\n"
            head = ""
        problems.append(Problem(ex.id, ex.prompt, head, tests, ex.completion))
        if limit is not None and n >= limit:
            break
    if kind is None:
        raise ValueError(f"{file}: no problems in this file")
    return kind, problems


# ---------------------------------------------------------------------------------------------
# Generation


def causal_lm(model: nn.Module) -> nn.Module:
    """The next-token model that transformers' `generate` runs: an HF causal LM as it is; an
    MTPModel (the kit's or Meta's) as a LlamaForCausalLM sharing its trunk, head 0, final norm
    and unembedding (the same Parameters, no copy)."""
    if not isinstance(model, MTPModel):
        return model
    n_trunk = len(model.layers)
    with init_empty_weights():
        lm = LlamaForCausalLM(copy.deepcopy(model.config))
    state = {
        kit_key(name, n_trunk): p
        for name, p in model.state_dict(keep_vars=True).items()
        if not name.startswith("heads.") or name.startswith("heads.0.")
    }
    lm.load_state_dict(state, strict=True, assign=True)
    return lm.to(model.lm_head.weight.device).eval()


def transformers_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerBase:
    """The kit tokenizer as a transformers tokenizer with the same ids and token strings."""
    return _transformers_tokenizer(tokenizer.name, tokenizer.data)


@functools.lru_cache(maxsize=8)
def _transformers_tokenizer(name: str, data: bytes) -> PreTrainedTokenizerBase:
    """`transformers_tokenizer` of a tokenizer file's name and bytes, built once per file."""
    if not name.endswith(".model"):  # tokenizer.json (the byte tokenizer is one too)
        from tokenizers import Tokenizer as HFTokenizer

        return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(data.decode()))
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads SentencePiece from a file
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(data)
        return AutoTokenizer.from_pretrained(tmp, split_special_tokens=True)


class CompletionStopStrings(StopStringCriteria):
    """transformers' StopStringCriteria on the tokens after column `start` only (the prompt's
    text neither stops a row nor starts a stop string that the completion finishes). It reads the
    tokens' own text, so a SentencePiece completion's leading space, which `Tokenizer.decode`
    drops, counts towards a stop string that starts with a space."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Iterable[str], start: int):
        super().__init__(tokenizer, list(stop))
        self.start = start

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs
    ) -> torch.BoolTensor:
        """Per row: True when its last token completes a stop string within the completion."""
        completion = input_ids[:, self.start :]
        if completion.shape[1] == 0:
            return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        return super().__call__(completion, scores, **kwargs)


def _completion(tokenizer, prompt: list[int], ids: list[int], stop: tuple[str, ...]) -> str:
    """Text of generated ids after their prompt's, up to the first EOS, cut before the first
    stop string."""
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = tokenizer.decode_after(prompt, ids)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop: Iterable[str] = (),
    seed: int = 0,
    batch_size: int = 8,
    speculative: bool = False,
    stats: dict | None = None,
    compile: bool = False,
) -> list[list[str]]:
    """n completions per prompt from head 0: greedy (temperature 0) or sampled, through
    transformers' `generate` with its KV cache, `batch_size` prompts at a time, left-padded.

    The input is BOS + the prompt's tokens, exactly as training starts a sequence (the prompt
    loses tokens on the left if it does not fit beside max_new_tokens). A completion ends at EOS
    or at the token that completes a stop string in it (`CompletionStopStrings`), and is cut
    before the first stop string. Sampling is seeded and leaves the global RNG as it was.

    speculative=True (an MTPModel, greedy only) decodes self-speculatively with the MTP heads
    (`wmtp_decode.greedy_decode_batch`): the same text in fewer forwards. Its statistics are
    added up into `stats` (forwards, row_forwards, tokens, proposed/accepted per extra head).
    compile=True (greedy) decodes over a static KV cache with each step's forward compiled
    (`wmtp_decode`, as gpt-fast does): the same text, at the speed the hardware allows.
    """
    if n > 1 and temperature == 0:
        raise ValueError(f"n={n} samples per prompt need temperature > 0 (greedy gives one)")
    if speculative and temperature != 0:
        raise ValueError("speculative decoding is greedy: use temperature 0")
    stop = tuple(stop)
    if speculative or (compile and temperature == 0):
        return _generate_greedy(
            model, tokenizer, prompts, max_new_tokens, stop, batch_size, speculative, compile, stats
        )
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    room = lm.config.max_position_embeddings - max_new_tokens - 1
    if room < 0:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} does not fit in the model's "
            f"{lm.config.max_position_embeddings} positions"
        )
    sampled = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **(sampled if temperature > 0 else {"do_sample": False}),
    )
    hf_tokenizer = transformers_tokenizer(tokenizer) if stop else None
    out: list[list[str]] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(prompts), batch_size):
            torch.manual_seed(seed + start)  # each batch its own seed: seed + its first index
            rows = [prompt_ids(tokenizer, p, room) for p in prompts[start : start + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            seqs = lm.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=(
                    [CompletionStopStrings(hf_tokenizer, stop, width)] if stop else None
                ),
            )
            new = seqs[:, width:].tolist()  # n rows per prompt
            texts = [_completion(tokenizer, rows[i // n], r, stop) for i, r in enumerate(new)]
            out += [texts[i : i + n] for i in range(0, len(texts), n)]
    return out


def _generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    stop: tuple[str, ...],
    batch_size: int,
    speculative: bool,
    compile: bool,
    stats: dict | None,
) -> list[list[str]]:
    """`generate`'s greedy completions through wmtp_decode (self-speculative, or over a compiled
    static cache), one per prompt. Stop strings cut the text afterwards (greedy text up to a stop
    string does not depend on where decoding stopped)."""
    if not isinstance(model, MTPModel):
        raise ValueError(
            "speculative and compiled decoding need an MTP model (wmtp_decode runs its heads)"
        )
    room = model.config.max_position_embeddings - max_new_tokens - 1
    if room < 0:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} does not fit in the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p, room) for p in prompts[start : start + batch_size]]
        new, batch_stats = greedy_decode_batch(
            model, rows, max_new_tokens, speculative=speculative, eos_id=tokenizer.eos_id,
            compile=compile,
        )  # fmt: skip
        out += [[_completion(tokenizer, row, ids, stop)] for row, ids in zip(rows, new)]
        if stats is not None and speculative:
            add_decode_stats(stats, batch_stats)
    return out


def add_decode_stats(total: dict, part: dict) -> None:
    """Add one `greedy_decode_batch` call's counts into `total` and refresh its ratios."""
    for key in ("forwards", "row_forwards", "tokens"):
        total[key] = total.get(key, 0) + part[key]
    for key in ("proposed", "accepted"):
        old = total.get(key) or [0] * len(part[key])
        total[key] = [a + b for a, b in zip(old, part[key])]
    total["tokens_per_forward"] = total["tokens"] / max(total["row_forwards"], 1)
    total["head_acceptance"] = [a / max(p, 1) for a, p in zip(total["accepted"], total["proposed"])]


# ---------------------------------------------------------------------------------------------
# Evaluation


def score(
    samples: Iterable[tuple[Problem, list[str]]],
    *,
    k: Iterable[int] = (1,),
    workers: int = 2,
    timeout: float = 10.0,
    on_result: Callable[[dict], None] | None = None,
    isolation: str = "auto",
) -> dict:
    """Check every (problem, completions) pair's programs in a pool of `workers` sandboxes and
    return {"pass@k": {k: mean over problems}, "problems": {id: (n, correct)}}.

    Checks start as soon as a pair arrives (generation of the next batch overlaps them), and
    `on_result` gets {"task_id", "sample", "completion", "passed", "status"} as each finishes.
    `isolation`: the sandbox's mode (wmtp_sandbox: auto, namespaces, hook, bwrap, unshare).
    """
    counts: dict[str, list[int]] = {}
    pending: dict[Future, tuple[str, int, str]] = {}

    def finish(futures: Iterable[Future]) -> None:
        for fut in futures:
            task_id, j, completion = pending.pop(fut)
            passed, status = fut.result()
            counts[task_id][1] += passed
            if on_result is not None:
                on_result(
                    {
                        "task_id": task_id,
                        "sample": j,
                        "completion": completion,
                        "passed": passed,
                        "status": status,
                    }
                )

    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        free.put(start_sandbox(isolation))

    def check(source: str) -> tuple[bool, str]:
        server = free.get()
        try:
            return check_program(source, timeout=timeout, sandbox=server)
        finally:
            free.put(server if server.poll() is None else start_sandbox(isolation))

    try:
        with ThreadPoolExecutor(workers) as pool:  # a worker waits on one sandbox at a time
            for problem, completions in samples:
                counts[problem.id] = [len(completions), 0]
                for j, completion in enumerate(completions):
                    pending[pool.submit(check, program(problem, completion))] = (
                        problem.id,
                        j,
                        completion,
                    )
                finish([f for f in list(pending) if f.done()])
            finish(as_completed(list(pending)))
    finally:
        for _ in range(workers):
            stop_sandbox(free.get())
    ks = sorted(set(k))
    return {
        "pass@k": {
            kk: sum(pass_at_k(n, c, kk) for n, c in counts.values()) / max(len(counts), 1)
            for kk in ks
        },
        "problems": {task_id: tuple(nc) for task_id, nc in counts.items()},
    }


def evaluate(
    model: nn.Module,
    tokenizer,
    dataset: str,
    *,
    split: str = "test",
    n: int = 1,
    k: Iterable[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    limit: int | None = None,
    workers: int = 2,
    timeout: float = 10.0,
    seed: int = 0,
    batch_size: int = 8,
    on_result: Callable[[dict], None] | None = None,
    speculative: bool = False,
    decode_stats: dict | None = None,
    skip: Collection[str] = (),
    on_generated: Callable[[int], None] | None = None,
    compile: bool = False,
    isolation: str = "auto",
) -> dict:
    """pass@k of a model on a HumanEval or MBPP dataset: prompts -> completions -> programs ->
    sandboxed checks. Returns `score`'s dict plus "kind". With `speculative`, completions come
    from self-speculative greedy decoding and its statistics are added into `decode_stats`.
    `skip`: ids of problems left out (an earlier, interrupted evaluation scored them);
    `on_generated(m)` after each batch of m problems' completions (progress); `compile`: greedy
    decoding over a compiled static cache (see `generate`)."""
    ks = sorted(set(k))
    for kk in ks:
        pass_at_k(n, 0, kk)  # k > n is an error before any generation
    kind, problems = load_problems(dataset, split, limit)
    problems = [p for p in problems if p.id not in skip]
    direct = speculative or (compile and temperature == 0)  # wmtp_decode runs the MTP model
    lm = model if direct else causal_lm(model)  # once, not per batch

    def samples() -> Iterator[tuple[Problem, list[str]]]:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            completions = generate(
                lm,
                tokenizer,
                [p.prompt for p in batch],
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                stop=STOP[kind],
                seed=seed + start,
                batch_size=batch_size,
                speculative=speculative,
                stats=decode_stats,
                compile=compile,
            )
            if on_generated is not None:
                on_generated(len(batch))
            yield from zip(batch, completions)

    result = score(
        samples(), k=ks, workers=workers, timeout=timeout, on_result=on_result, isolation=isolation
    )
    return {"kind": kind} | result


def greedy_pass_at_1(
    model: nn.Module | None, tokenizer, cfg: Config, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """The trainer's periodic check: greedy pass@1 on the first eval.limit problems of every
    eval dataset on `device`, as {"eval/pass_at_1/<name>": value}; {} when model is None (ranks
    other than 0). An MTPModel is viewed through `causal_lm` (its parameters, no copy)."""
    if model is None:
        return {}
    lm = causal_lm(model).to(device)
    e = cfg.eval
    out = {}
    for name in e.datasets:
        result = evaluate(
            lm,
            tokenizer,
            cfg.paths.datasets[name],
            split=e.split,
            max_new_tokens=e.max_new_tokens,
            limit=e.limit,
            workers=e.workers,
            timeout=e.timeout,
            batch_size=e.batch_size,
            isolation=e.sandbox,
        )
        out[f"eval/pass_at_1/{name}"] = result["pass@k"][1]
    return out
