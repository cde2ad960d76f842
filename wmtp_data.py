"""Data: datasets, encoding, batching.

Read top to bottom: datasets -> token ids -> batches (streamed, sharded by rank, shuffled in a
bounded buffer, resumable by example count).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch

import io_stream

if TYPE_CHECKING:
    from wmtp import Config

# CodeContests' Language enum: PYTHON (2) = 1, PYTHON3 = 3; some exports spell them out
PYTHON_LANGUAGES = (1, 3, "PYTHON", "PYTHON3")
KINDS = ("mbpp", "humaneval", "codecontests", "custom", "text")

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
# Batches: streamed, sharded by rank, shuffled in a bounded buffer, resumable by example count

SHUFFLE_BUFFER = 10_000


def is_heldout(example_id: str, fraction: float) -> bool:
    """Deterministic held-out membership by a hash of the example's problem: the id, or for a
    CodeContests solution (`{name}/solutions/{i}`, `{name}/incorrect_solutions/{i}`) the problem
    name, so that all solutions of a problem fall on the same side."""
    parts = str(example_id).rsplit("/", 2)
    solution = len(parts) == 3 and parts[1] in ("solutions", "incorrect_solutions")
    problem = parts[0] if solution else str(example_id)
    h = int.from_bytes(hashlib.sha1(problem.encode()).digest()[:4], "little")
    return h % 10_000 < fraction * 10_000


def iter_examples(
    cfg: Config, part: str = "all", *, names: list[str] | None = None, split: str | None = None
) -> Iterator[Example]:
    """Examples of every dataset in `names` (default data.train) from `split` (default data.split);
    part = all | train | heldout (the critic's split of them by data.heldout_fraction)."""
    for name in cfg.data.train if names is None else names:
        for ex in iter_dataset(
            cfg.paths.datasets[name], cfg.data.split if split is None else split
        ):
            if part == "all" or is_heldout(ex.id, cfg.data.heldout_fraction) == (part == "heldout"):
                yield ex


def _shuffled(items: Iterator, rng: random.Random, buffer: int) -> Iterator:
    """Approximate shuffle with bounded memory (a reservoir of `buffer` items)."""
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def iter_batches(
    cfg: Config,
    tokenizer,
    batch_size: int,
    *,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    skip_examples: int = 0,
    part: str = "all",
    shuffle: bool | None = None,
    drop_last: bool = True,
    names: list[str] | None = None,
    split: str | None = None,
    dropped: list[int] | None = None,
) -> Iterator[dict]:
    """Collated batches for this rank: every rank gets different examples and the same batch count.

    The shuffled stream is the same for any world size; each group of batch_size x world examples
    is split between the ranks, and `skip_examples` skips the start of the stream (resume).
    The last incomplete group is dropped, or with drop_last=False (evaluation: every example once)
    split as evenly as the ranks allow; a rank left without an example then gets a one-example
    batch whose loss_mask is all False, so that every rank runs the same number of forwards.
    `names` and `split` choose other datasets than data.train's (see iter_examples); `dropped`,
    a list, gets the number of examples the last incomplete group lost when the stream ends."""

    def make(mine: list[Example]) -> dict:
        encoded = [
            encode(tokenizer, e, cfg.data.max_length, prompt_loss=cfg.data.prompt_loss)
            for e in mine
        ]
        batch = collate(encoded, tokenizer.pad_id)
        batch["n_cut"] = sum(cut for _, _, cut in encoded)
        if all(e.label is not None for e in mine):
            batch["label"] = torch.tensor([float(e.label) for e in mine])
        return batch

    examples = iter_examples(cfg, part, names=names, split=split)
    if cfg.data.shuffle if shuffle is None else shuffle:
        examples = _shuffled(examples, random.Random(f"{cfg.train.seed}/{epoch}"), SHUFFLE_BUFFER)
    for _ in zip(range(skip_examples), examples):
        pass
    group = []
    for ex in examples:
        group.append(ex)
        if len(group) == batch_size * world:
            yield make(group[rank * batch_size : (rank + 1) * batch_size])
            group = []
    if dropped is not None:
        dropped.append(len(group) if drop_last else 0)
    if group and not drop_last:
        share = -(-len(group) // world)  # ceil
        mine = group[rank * share : (rank + 1) * share]
        batch = make(mine or group[:1])
        if not mine:
            batch["loss_mask"][:] = False
            batch["n_cut"] = 0
        yield batch
