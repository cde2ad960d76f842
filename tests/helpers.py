"""What the tests share: tiny random models in every format the loader reads, tiny trainer runs
(TINY overrides, datasets, configs) and the loss computed the obvious way.

Each model writer also puts a tokenizer in the folder (the byte tokenizer unless one is given)
and returns the state dict exactly as written (for Meta native: unsharded), so tests can compute
the truth from it independently of the loader.
"""

import io
import json
import math
import os

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import io_stream
from wmtp import load_config
from wmtp_model import Tokenizer, byte_tokenizer, init_mtp_model, save_model

CODE_TEXT = """\
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Queue:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)

    def pop(self):
        return self.items.pop(0)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:
            return False
    return True


assert fib(10) == 55
assert [p for p in range(20) if is_prime(p)] == [2, 3, 5, 7, 11, 13, 17, 19]
print("sum of squares:", sum(i * i for i in range(100)))
with open("data.txt") as f:
    lines = [line.strip() for line in f if line.strip()]
"""


def write_tokenizer(folder: str, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """Write a tokenizer's files into folder (the byte tokenizer by default)."""
    tokenizer = tokenizer or byte_tokenizer()
    for name, data in tokenizer.files().items():
        io_stream.write_bytes(data, io_stream.join(folder, name))
    return tokenizer


def write_sentencepiece(folder: str, text: str = CODE_TEXT, *, vocab_size: int = 120) -> bytes:
    """Train a tiny SentencePiece model on text (a few KB), write folder/tokenizer.model, return its bytes."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((text * 4).splitlines()),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",  # as Llama's: code keeps its spaces
        remove_extra_whitespaces=False,
        pad_id=3,
        minloglevel=2,
    )
    io_stream.write_bytes(out.getvalue(), io_stream.join(folder, "tokenizer.model"))
    return out.getvalue()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Fill every parameter with N(0, 1/fan_in) (norms: 1 + N(0, 0.1)) so that every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _meta_block(
    g: torch.Generator, dim: int, n_attn_heads: int, n_kv_heads: int, hidden: int
) -> dict:
    head_dim = dim // n_attn_heads

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    return {
        "attention.wq.weight": w(n_attn_heads * head_dim, dim),
        "attention.wk.weight": w(n_kv_heads * head_dim, dim),
        "attention.wv.weight": w(n_kv_heads * head_dim, dim),
        "attention.wo.weight": w(dim, n_attn_heads * head_dim),
        "feed_forward.w1.weight": w(hidden, dim),
        "feed_forward.w2.weight": w(dim, hidden),
        "feed_forward.w3.weight": w(hidden, dim),
        "attention_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
        "ffn_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
    }


# fairscale layers of Meta's reference code: ColumnParallelLinear splits output rows,
# RowParallelLinear and ParallelEmbedding split input columns; norms are replicated
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2", "tok_embeddings")


def write_meta_native(
    folder: str,
    *,
    H: int = 4,
    shards: int = 1,
    dim: int = 64,
    n_layers: int | None = None,
    n_attn_heads: int = 4,
    n_kv_heads: int | None = 2,
    vocab_size: int = 259,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = None,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    rope_freqs: bool = False,
    tokenizer: Tokenizer | None = None,
) -> dict[str, torch.Tensor]:
    """Write params.json + consolidated.NN.pth (shards files) in Meta's MTP layout; n_layers counts
    trunk + H head blocks (default H + 2). Returns the unsharded state dict."""
    n_layers = n_layers or H + 2
    n_kv = n_kv_heads or n_attn_heads
    # Meta's FFN width, spelled out here independently of the kit's ffn_width
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    hidden = multiple_of * math.ceil(hidden / multiple_of)
    g = torch.Generator().manual_seed(seed)
    sd = {"tok_embeddings.weight": torch.randn(vocab_size, dim, generator=g)}
    for i in range(n_layers - H + 1):
        block = _meta_block(g, dim, n_attn_heads, n_kv, hidden)
        sd |= {f"layers.{i}.{k}": v for k, v in block.items()}
    for j in range(H - 1):
        block = _meta_block(g, dim, n_attn_heads, n_kv, hidden)
        sd |= {f"extra_heads.{j}.{k}": v for k, v in block.items()}
    sd["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd["output.weight"] = torch.randn(vocab_size, dim, generator=g) / math.sqrt(dim)
    if rope_freqs:
        sd["rope.freqs"] = 1.0 / rope_theta ** (
            torch.arange(0, dim // n_attn_heads, 2) / (dim // n_attn_heads)
        )
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_attn_heads,
        "vocab_size": vocab_size,
        "multiple_of": multiple_of,
        "norm_eps": norm_eps,
        "rope_theta": rope_theta,
        "n_future_tokens": H,
    }
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    io_stream.write_bytes(json.dumps(params).encode(), io_stream.join(folder, "params.json"))
    for s in range(shards):
        piece = {}
        for key, t in sd.items():
            kind = key.split(".")[-2]  # wq, w2, tok_embeddings, attention_norm, ...
            if kind in COLUMN_PARALLEL:
                piece[key] = t.chunk(shards, dim=0)[s].clone()
            elif kind in ROW_PARALLEL:
                piece[key] = t.chunk(shards, dim=1)[s].clone()
            else:
                piece[key] = t.clone()
        with io_stream.open_stream(io_stream.join(folder, f"consolidated.{s:02d}.pth"), "wb") as f:
            torch.save(piece, f)
    write_tokenizer(folder, tokenizer)
    return sd


def tiny_llama_config(
    *,
    dim: int = 64,
    n_layers: int = 3,
    n_attn_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 259,
    ffn_dim: int = 96,
    tie: bool = False,
    **extra,
) -> LlamaConfig:
    """A tiny LlamaConfig (byte-tokenizer vocabulary by default)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=ffn_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_attn_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=257,
        **extra,
    )


def write_hf_folder(
    folder: str,
    state: dict[str, torch.Tensor],
    config: LlamaConfig,
    architecture: str,
    *,
    shards: int = 1,
    tokenizer: Tokenizer | None = None,
    weights: str = "safetensors",
) -> None:
    """Write config.json and model.safetensors (or shards + model.safetensors.index.json); with
    weights="bin" the same as PyTorch pickles, pytorch_model.bin[.index.json], via torch.save."""
    config_dict = config.to_dict() | {"architectures": [architecture]}
    io_stream.write_bytes(json.dumps(config_dict).encode(), io_stream.join(folder, "config.json"))
    stem, ext = ("model", "safetensors") if weights == "safetensors" else ("pytorch_model", "bin")

    def write(part: dict[str, torch.Tensor], name: str) -> None:
        if weights == "safetensors":
            io_stream.write_safetensors(part, io_stream.join(folder, name), {"format": "pt"})
        else:
            with io_stream.open_stream(io_stream.join(folder, name), "wb") as f:
                torch.save(part, f)

    keys = list(state)
    if shards == 1:
        write(state, f"{stem}.{ext}")
    else:
        weight_map = {}
        for s in range(shards):
            name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
            part = {k: state[k] for k in keys[s::shards]}
            write(part, name)
            weight_map |= dict.fromkeys(part, name)
        index = {"metadata": {}, "weight_map": weight_map}
        io_stream.write_bytes(
            json.dumps(index).encode(), io_stream.join(folder, f"{stem}.{ext}.index.json")
        )
    write_tokenizer(folder, tokenizer)


def write_hf_llama(
    folder: str,
    *,
    shards: int = 1,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    weights: str = "safetensors",
    **config,
) -> dict[str, torch.Tensor]:
    """Write a tiny random LlamaForCausalLM folder; returns its state dict."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    randomize(model, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_hf_folder(
        folder,
        state,
        model.config,
        "LlamaForCausalLM",
        shards=shards,
        tokenizer=tokenizer,
        weights=weights,
    )
    return state


class StarlingRM(torch.nn.Module):
    """The module layout of Starling-RM-7B-alpha's GPTRewardModel (its model card's code)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.model = LlamaForCausalLM(config)
        self.transformer = self.model.model
        self.v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)


def write_reward_model(
    folder: str,
    layout: str = "seqcls",
    *,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    weights: str = "safetensors",
    **config,
) -> dict[str, torch.Tensor]:
    """Write a tiny reward model: HF LlamaForSequenceClassification ("seqcls") or a Starling-RM
    GPTRewardModel state dict ("starling", trunk saved twice as transformer.* and model.model.*;
    as the released pytorch_model.bin the two share storage, in safetensors they are copies)."""
    torch.manual_seed(seed)
    if layout == "seqcls":
        cfg = tiny_llama_config(num_labels=1, pad_token_id=258, **config)
        model, architecture = LlamaForSequenceClassification(cfg), "LlamaForSequenceClassification"
    elif layout == "starling":
        cfg = tiny_llama_config(pad_token_id=258, **config)
        model, architecture = StarlingRM(cfg), "LlamaForCausalLM"
    else:
        raise ValueError(f"unknown reward layout {layout!r}")
    randomize(model, seed)
    state = model.state_dict()
    if weights == "safetensors":
        state = {k: v.clone() for k, v in state.items()}
    write_hf_folder(folder, state, cfg, architecture, tokenizer=tokenizer, weights=weights)
    return state


# ---------------------------------------------------------------------------------------------
# Tiny runs: a model, data and config overrides that make each trainer run take seconds on 2 cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
TINY_MODEL = [  # the shipped config's model and batches, shrunk
    "model.dim=32",
    "model.n_layers=5",
    "model.n_attn_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=128",
    "data.max_length=96",
    "train.batch_size=2",
    "train.log_every=1",
]
TINY = [  # and short runs of both stages
    *TINY_MODEL,
    "model.n_heads=4",
    "train.warmup_steps=1",
    "critic.batch_size=2",
    "critic.max_steps=6",
    "critic.eval_every=2",
]


def tiny_model(
    n_layers: int = 5,
    n_heads: int = 4,
    seed: int = 0,
    max_seq_len: int = 128,
    vocab_size: int = 259,
):
    """A tiny random MTP model over the byte tokenizer's vocabulary (TINY's dimensions)."""
    return init_mtp_model(
        vocab_size=vocab_size,
        dim=32,
        n_layers=n_layers,
        n_heads=n_heads,
        n_attn_heads=2,
        n_kv_heads=1,
        max_seq_len=max_seq_len,
        seed=seed,
    )


def write_dataset(path: str, n: int = 12, labels: bool = True) -> None:
    """A custom prompt/completion JSONL dataset, with 0/1 labels when asked."""
    lines = []
    for i in range(n):
        rec = {"prompt": f"# task {i}: add {i}\n", "completion": f"def f(x):\n    return x + {i}\n"}
        if labels:
            rec["label"] = float(i % 2)
        lines.append(json.dumps(rec))
    io_stream.write_bytes(("\n".join(lines) + "\n").encode(), path)


def make_config(where: str, tmp_path, *extra: str) -> list[str]:
    """Overrides that put data, outputs and MLflow under `where` (a local folder or s3:// prefix)."""
    data = io_stream.join(where, "data", "train.jsonl")
    if not io_stream.exists(data):
        write_dataset(data)
    return [
        *TINY,
        f"paths.datasets={{toy: {data}}}",
        "data.heldout=[]",
        "data.train=[toy]",
        f"paths.checkpoints={io_stream.join(where, 'ckpt')}",
        f"paths.value_head={io_stream.join(where, 'vh', 'value_head.safetensors')}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"mlflow.artifact_location={io_stream.join(where, 'mlartifacts')}",
        *extra,
    ]


def write_reference(path: str, tokenizer=None, seed: int = 1) -> None:
    """A tiny next-token model in the kit's HF-compatible layout (loadable as kind='causal')."""
    save_model(tiny_model(n_layers=3, n_heads=1, seed=seed), path, tokenizer or byte_tokenizer())


def run_stage2(overrides, resume=None, stop_after=None):
    """train_mtp.train on the shipped config with `overrides`."""
    import train_mtp

    return train_mtp.train(load_config(CONFIG, overrides), resume, stop_after=stop_after)


# ---------------------------------------------------------------------------------------------
# The loss the obvious way: full [B,S,H,V] logits and F.cross_entropy


def naive_ce(model, ids, attention_mask, labels) -> torch.Tensor:
    """Per-slot fp32 CE [B,S,H] from the full logits and plain F.cross_entropy (0 where ignored)."""
    logits = model(ids, attention_mask).float()
    ce = F.cross_entropy(
        logits.flatten(0, 2), labels.flatten(), ignore_index=-100, reduction="none"
    )
    return ce.view(labels.shape)


def naive_loss(model, ids, attention_mask, labels, weights) -> torch.Tensor:
    """Σ w·m·CE / Σ w·m computed the obvious way."""
    m = (labels != -100).float()
    return (weights * m * naive_ce(model, ids, attention_mask, labels)).sum() / (weights * m).sum()
