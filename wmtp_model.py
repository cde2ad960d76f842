"""Models and tokenizers: the MTP model (Hugging Face Llama blocks in Meta's layout), one loader
for every supported checkpoint format, `save_model`, and tokenizers.

MTP layout (Gloeckle et al. 2024): the trunk is the embedding and `n_trunk` decoder blocks; each of
the H heads is one decoder block applied to the *same* trunk output; all heads share the final
RMSNorm and the unembedding. Head k at position t predicts token t+k+1.
"""

from __future__ import annotations

import json
import re
import time

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.serialization import skip_data
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Cache,
    GenerationConfig,
    LlamaConfig,
    LlamaModel,
)
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

import io_stream

HEADS_FILE = "mtp_heads.safetensors"  # the kit's format: heads 1..H-1
MTP_JSON = "mtp.json"  # the kit's format: written last, it marks a complete save

# ---------------------------------------------------------------------------------------------
# The MTP model


class Unembedding(nn.Linear):
    """The shared vocabulary projection (bias-free). With `fn`, its forward returns fn(x, weight)
    instead of x @ weight.T, so that a computation reading the weight directly (mtp_loss's chunked
    cross-entropy) runs as this module's forward and its hooks fire: FSDP gathers the weight, and
    reduces its gradient, as for any module that ran forward."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, x, fn=None):
        return super().forward(x) if fn is None else fn(x, self.weight)


class MTPModel(nn.Module):
    """A Llama trunk plus H one-block heads sharing the final norm and the unembedding."""

    def __init__(self, config: LlamaConfig, n_heads: int):
        super().__init__()
        if config.num_hidden_layers < 1 or n_heads < 1:
            raise ValueError(
                f"MTPModel needs num_hidden_layers >= 1 and n_heads >= 1, got "
                f"{config.num_hidden_layers} and {n_heads}"
            )
        config._attn_implementation = config._attn_implementation or "sdpa"
        # num_hidden_layers = n_trunk + 1: the HF next-token view (trunk + head 0)
        self.config = config
        self.n_heads = n_heads
        n_trunk = config.num_hidden_layers - 1
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(n_trunk))
        # distinct layer_idx: one DynamicCache holds the trunk's K/V and then one entry per head
        self.heads = nn.ModuleList(LlamaDecoderLayer(config, n_trunk + k) for k in range(n_heads))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = Unembedding(config.hidden_size, config.vocab_size)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def run_trunk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Trunk output [B,S,D] and the context (positions, attention mask, cache) heads need.

        Decoding passes a cache (the trunk and each head append their K/V to it), an attention_mask
        over cached + new tokens and the new tokens' position_ids [B,S].
        """
        hidden = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        ctx = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(hidden, position_ids=position_ids),
            "cache": cache,
        }
        for layer in self.layers:
            hidden = layer(hidden, **ctx)
        return hidden, ctx

    def run_head(self, k: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Head k's final *normed* hidden state [B,S,D] (lm_head of it gives head k's logits)."""
        return self.norm(self.heads[k](hidden, **ctx))

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (accelerate's FSDP2 wrapping shards it as its own unit)."""
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """The shared unembedding (accelerate's FSDP2 wrapping groups it with the final norm)."""
        return self.lm_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, fn=None
    ):
        """Logits [B,S,H,V]; with fn, returns fn(self, input_ids, attention_mask) instead."""
        if fn is not None:
            return fn(self, input_ids, attention_mask)
        hidden, ctx = self.run_trunk(input_ids, attention_mask)
        return torch.stack(
            [self.lm_head(self.run_head(k, hidden, ctx)) for k in range(self.n_heads)], dim=2
        )


def ffn_width(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden width: int(2*4*dim/3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama_config(
    *,
    vocab_size: int,
    dim: int,
    n_blocks: int,
    n_attn_heads: int,
    n_kv_heads: int | None,
    ffn_dim: int,
    max_seq_len: int,
    rope_theta: float,
    norm_eps: float,
) -> LlamaConfig:
    """The HF LlamaConfig of a Llama-2-style model with n_blocks decoder blocks."""
    if dim % n_attn_heads:
        raise ValueError(f"dim {dim} is not a multiple of n_attn_heads {n_attn_heads}")
    n_kv_heads = n_kv_heads or n_attn_heads
    if n_attn_heads % n_kv_heads:
        raise ValueError(
            f"n_attn_heads {n_attn_heads} is not a multiple of n_kv_heads {n_kv_heads}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=ffn_dim,
        num_hidden_layers=n_blocks,
        num_attention_heads=n_attn_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=False,
    )


def init_mtp_model(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int = 4,
    n_attn_heads: int,
    n_kv_heads: int | None = None,
    ffn_dim: int | None = None,
    max_seq_len: int = 2048,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MTPModel:
    """Random MTPModel; n_layers counts trunk + head blocks as Meta's params.json does (n_trunk = n_layers - n_heads)."""
    if n_layers < n_heads:
        raise ValueError(
            f"n_layers {n_layers} counts trunk + head blocks, so it must be >= n_heads {n_heads}"
        )
    config = llama_config(
        vocab_size=vocab_size,
        dim=dim,
        n_blocks=n_layers - n_heads + 1,
        n_attn_heads=n_attn_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim or ffn_width(dim),  # Meta's formula, multiple_of=256
        max_seq_len=max_seq_len,
        rope_theta=rope_theta,
        norm_eps=norm_eps,
    )
    _check_size(f"init_mtp_model(dim={dim}, n_layers={n_layers})", config, None, n_heads - 1)
    generator = torch.Generator().manual_seed(seed)
    model = MTPModel(config, n_heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # HF Llama's initializer: N(0, 0.02) for every linear and the embedding
                p.normal_(0.0, config.initializer_range, generator=generator)
            p.data = p.data.to(dtype)  # parameters only: the rotary inv_freq buffer stays float32
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizers


SPECIAL_TOKENS = {  # names tried when a tokenizer.json comes without a tokenizer_config.json
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


class Tokenizer:
    """SentencePiece or `tokenizers` tokenizer; keeps its file name and bytes so it can be saved.

    Special ids come from the SentencePiece model, or for tokenizer.json from `special` (token
    strings, as tokenizer_config.json gives them) or well-known names; a missing pad id is eos.
    """

    def __init__(
        self, name: str, data: bytes, *, source: str, special: dict[str, str] | None = None
    ):
        self.name = name  # file name to save it under: tokenizer.model or tokenizer.json
        self.data = data
        self.source = source
        self._sp = self._hf = None
        if name.endswith(".model"):
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_proto=data)
            except Exception as exc:
                raise ValueError(f"{source}: not a SentencePiece model ({exc})") from None
            self.vocab_size = self._sp.get_piece_size()
            ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_str(data.decode())
            except Exception as exc:
                raise ValueError(f"{source}: not a tokenizers JSON file ({exc})") from None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            ids = {}
            for what, names in SPECIAL_TOKENS.items():
                names = (special[what],) if special and special.get(what) else names
                found = [i for i in map(self._hf.token_to_id, names) if i is not None]
                ids[what] = found[0] if found else -1
        for what in ("bos", "eos"):
            if ids[what] < 0:
                raise ValueError(f"{source}: the tokenizer defines no {what.upper()} token")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; special tokens are dropped."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def decode_after(self, context: list[int], ids: list[int]) -> str:
        """Text that `ids` add after the tokens `context` (a prompt): decoded with the context's
        last tokens and cut after them, because SentencePiece (and Metaspace) decoding drops the
        space a text's first token starts with, which a continuation keeps ("    return" after a
        prompt decoded alone is "   return")."""
        special = (self.bos_id, self.eos_id, self.pad_id)
        tail = [int(i) for i in context if int(i) not in special][-4:]
        if not tail:
            return self.decode(ids)
        head, text = self.decode(tail), self.decode([*tail, *ids])
        return text[len(head) :] if text.startswith(head) else self.decode(ids)

    def files(self) -> dict[str, bytes]:
        """The files that store this tokenizer: its own, plus the tokenizer.json and
        tokenizer_config.json that transformers saves for it, so that AutoTokenizer loads it with
        the same special tokens and prepends BOS as training does (BOS + `encode`)."""
        import os
        import tempfile

        from tokenizers import Tokenizer as HFTokenizer
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        piece = self._sp.id_to_piece if self._sp is not None else self._hf.id_to_token
        ids = (self.bos_id, self.eos_id, self.pad_id)
        options = {f"{w}_token": piece(i) for w, i in zip(("bos", "eos", "pad"), ids)}
        options |= {"add_bos_token": True, "add_eos_token": False}
        with tempfile.TemporaryDirectory() as tmp:  # transformers reads and writes only files
            if self._sp is not None:  # converted to a `tokenizers` model that encodes the same;
                with open(os.path.join(tmp, self.name), "wb") as f:  # like SentencePiece, it
                    f.write(self.data)  # reads "<s>" in text as text, not as a special token
                hf = AutoTokenizer.from_pretrained(tmp, split_special_tokens=True, **options)
            else:
                hf = PreTrainedTokenizerFast(
                    tokenizer_object=HFTokenizer.from_str(self.data.decode()), **options
                )
            out = os.path.join(tmp, "saved")
            hf.save_pretrained(out)
            saved = {}
            for name in sorted(os.listdir(out)):
                with open(os.path.join(out, name), "rb") as f:
                    saved[name] = f.read()
        return {self.name: self.data} | saved

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | None) -> Tokenizer:
    """tokenizer.model (preferred) or tokenizer.json from a folder or file, local or S3; None: bytes."""
    if path is None:
        return byte_tokenizer()
    _, p = io_stream.resolve(path)
    if p.endswith((".model", ".json")):
        file, folder = p, p.rsplit("/", 1)[0]
    else:
        names = io_stream.list_dir(p)
        found = [n for n in ("tokenizer.model", "tokenizer.json") if n in names]
        if not found:
            raise FileNotFoundError(
                f"{p}: no tokenizer.model or tokenizer.json here (files: {_short(names) or 'none'})"
            )
        file, folder = io_stream.join(p, found[0]), p
    data = io_stream.read_bytes(file)
    special = None
    config_path = io_stream.join(folder, "tokenizer_config.json")
    if file.endswith(".json") and io_stream.exists(config_path):
        config = _read_json(config_path)
        special = {}
        for what in SPECIAL_TOKENS:
            token = config.get(f"{what}_token")
            special[what] = token.get("content") if isinstance(token, dict) else token
    return Tokenizer(file.rsplit("/", 1)[-1], data, source=file, special=special)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (the ByteLevel alphabet)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer built in memory: ids 0..255 are the bytes, then <s>, </s>, <pad>."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {c: b for b, c in enumerate(_byte_chars())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
    special = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
    return Tokenizer(
        "tokenizer.json", tok.to_str().encode(), source="byte_tokenizer()", special=special
    )


SAMPLE_CODE = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "for i in range(10):\n\tprint(f'{i:>3} -> {i ** 2}')  # squares\n"
    'assert add(2, 3) == 5, "ok"\nimport sys; x = {"k": [1, 2.5, None, True]}\n'
)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when vocab size, special ids and the ids of a fixed code sample all agree."""
    ids = [(t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.encode(SAMPLE_CODE)) for t in (a, b)]
    return ids[0] == ids[1]


# ---------------------------------------------------------------------------------------------
# Reward model


class RewardModel(nn.Module):
    """A Llama trunk (with its final norm) and a linear score read at the last attended token."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config._attn_implementation = config._attn_implementation or "sdpa"
        self.config = config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rewards [B], float32, at each row's rightmost token with attention_mask 1."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        batch, seq = input_ids.shape
        positions = torch.arange(seq, device=input_ids.device)
        if attention_mask is None:
            last = positions[-1].expand(batch)
        else:  # rightmost attended position, so left and right padding both work
            last = (positions * attention_mask.long()).argmax(-1)
        hidden = out.last_hidden_state[torch.arange(batch, device=input_ids.device), last]
        return self.score(hidden).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# Loading

KINDS = ("mtp", "causal", "reward")
PTH = re.compile(r"consolidated\.(\d+)\.pth")
# an HF folder's weights: one file or a sharded set with its index; safetensors preferred
HF_WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
META_BLOCK = {  # Meta block key -> HF LlamaDecoderLayer key
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Starling-RM's GPTRewardModel holds its trunk twice (transformer.* is model.model.*); older dumps use model.*
STARLING_PREFIXES = ("transformer.", "model.model.", "model.")


def _short(keys) -> str:
    """At most eight sorted names, then how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")


def _read_json(path: str) -> dict:
    """A JSON object from a small local or S3 file."""
    try:
        data = json.loads(io_stream.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_keys(source: str, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """Raise one error listing missing keys, unexpected keys and shape mismatches."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(found[k])} vs {tuple(expected[k])}"
        for k in sorted(expected.keys() & found.keys())
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch, file vs model: {'; '.join(wrong[:8])}")
    if problems:
        raise ValueError(f"{source}: weights do not fit the model: " + "; ".join(problems))


def _place(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """t on device, floating tensors cast to dtype when one is given (no copy when nothing changes)."""
    return t.to(
        device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype
    )


def _shapes(model: nn.Module) -> dict[str, tuple]:
    """Parameter/buffer names and shapes of a (meta-device) model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


MAX_PARAMS = 2**41  # ~2.2T parameters: past any model the kit trains; a bigger one is a bad file


def _declared_params(config, extra_blocks: int = 0) -> int:
    """Parameters a config declares, LM head left out: embedding, decoder blocks (+ extra_blocks),
    final norm. Exact for Llama; for other models a lower bound (one norm per block)."""
    dim = config.hidden_size
    blocks = config.num_hidden_layers + extra_blocks
    if config.model_type != "llama":
        return (config.vocab_size + blocks) * dim
    attn = 2 * dim * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    block = attn + 3 * dim * config.intermediate_size + 2 * dim
    return config.vocab_size * dim + blocks * block + dim


def _check_size(source: str, config, stored: int | None, extra_blocks: int = 0) -> None:
    """Refuse, before anything is built, a config that declares more parameters than its weight
    files hold (`stored` values, None: no files) or than MAX_PARAMS (n_layers: 10**12)."""
    declared = _declared_params(config, extra_blocks)
    if stored is not None and declared > stored:
        raise ValueError(
            f"{source}: declares {declared:,} parameters, more than its weight files hold "
            f"({stored:,} values)"
        )
    if declared > MAX_PARAMS:
        raise ValueError(
            f"{source}: declares {declared:,} parameters, more than the kit's limit of "
            f"{MAX_PARAMS:,}"
        )


def detect_format(path: str, names: list[str]) -> str:
    """'kit', 'meta' or 'hf' from the files present in a model folder."""
    has = set(names)
    weights = any(has & set(pair) for pair in HF_WEIGHTS)
    hf = "config.json" in has and weights
    if has & {MTP_JSON, HEADS_FILE}:  # the kit's files: complete, or refused (never heads copied)
        present = {"config.json": "config.json" in has, "model.safetensors": weights}
        missing = [n for n, ok in present.items() if not ok]
        missing += [n for n in (HEADS_FILE, MTP_JSON) if n not in has]
        if missing:
            raise ValueError(
                f"{path}: an incomplete save of the kit's format ({', '.join(missing)} missing; "
                f"the save writes {MTP_JSON} last): save the model again"
            )
        return "kit"
    if "params.json" in has and any(PTH.fullmatch(n) for n in names):
        return "meta"
    if hf:
        return "hf"
    if not names:
        raise FileNotFoundError(f"{path}: no such folder, or it is empty")
    raise ValueError(
        f"{path}: no model found (files: {_short(names)}); expected params.json + consolidated.NN.pth "
        f"(Meta native) or config.json + model.safetensors[.index.json] or pytorch_model.bin[.index.json] "
        f"(Hugging Face / this kit)"
    )


def load_model(
    path: str,
    *,
    kind: str = "mtp",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    n_heads: int | None = None,
    meta_weights: bool = False,
) -> nn.Module:
    """Load a model folder (local or S3), its format detected from the files present.

    meta_weights=True builds the same model with its parameters on the meta device and reads no
    weights: for ranks that receive rank 0's weights (FSDP cpu_ram_efficient_loading).

    kind="mtp": an MTPModel from Meta native, the kit's own format, or a plain HF Llama with
    n_heads=H (heads 1..H-1 start as copies of its last block). kind="causal": an
    AutoModelForCausalLM from an HF folder. kind="reward": a RewardModel from an HF
    sequence-classification or Starling-RM folder. dtype=None keeps the stored dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    _, path = io_stream.resolve(path)
    device = torch.device(device)
    fmt = detect_format(path, io_stream.list_dir(path))
    if fmt == "meta":
        if kind != "mtp":
            raise ValueError(
                f"{path}: a Meta native checkpoint loads only as kind='mtp', not {kind!r}"
            )
        return _load_meta(
            path, n_heads=n_heads, dtype=dtype, device=device, meta_weights=meta_weights
        )
    if meta_weights:
        device = torch.device("meta")
    if kind == "mtp":
        return _load_llama_mtp(path, kit=fmt == "kit", n_heads=n_heads, dtype=dtype, device=device)
    if kind == "causal":
        return _load_causal(path, dtype=dtype, device=device)
    return _load_reward(path, dtype=dtype, device=device)


def weights_nbytes(path: str) -> int:
    """Bytes of an HF folder's weights, from the safetensors headers or the .bin file sizes."""
    _, path = io_stream.resolve(path)
    total = 0
    for file in (io_stream.join(path, name) for name in _weight_files(path)):
        if file.endswith(".bin"):  # a zip of one record per storage: its size, give or take KiB
            total += io_stream.file_size(file)
        else:
            header, _, _ = io_stream.read_safetensors_header(file)
            total += sum(e - b for b, e in (info["data_offsets"] for info in header.values()))
    return total


def load_pth(path: str, *, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """A weights-only .pth/.bin state dict: memory-mapped when local, from a seekable stream on
    S3; with shapes_only, meta tensors from the pickle alone (the zip directory and record
    headers are read, no tensor record)."""
    kind, p = io_stream.resolve(path)
    f = None
    try:
        if shapes_only:
            with io_stream.open_stream(p, block_size=2**16) as f, skip_data():
                sd = torch.load(f, map_location="meta", weights_only=True)
        elif kind == "local":
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        else:
            # torch.load reads each tensor record with one big readinto, which bypasses the
            # buffer and is filled by parallel GETs; the small zip-header reads hit the buffer
            with io_stream.open_stream(p, block_size=2**20) as f:
                sd = torch.load(f, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # zip, unpickling and weights-only refusals share no base class
        if f is not None and io_stream.stream_failure(f) is not None:
            raise io_stream.stream_failure(f) from None  # the network failed, not the file
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{p}: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {why})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p}: expected a flat dict of tensors")
    return sd


def _shard_dim(key: str) -> int | None:
    """Model-parallel split dim of a Meta key: 0 column-parallel, 1 row-parallel, None replicated."""
    if key == "output.weight" or key.endswith(
        ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")
    ):
        return 0
    if key == "tok_embeddings.weight" or key.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def _merge_shards(
    shards: list[dict[str, torch.Tensor]], files: list[str]
) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards, freeing each piece as it is merged."""
    first = shards[0]
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != first.keys():
            raise ValueError(
                f"{file}: tensors differ from {files[0]}: {_short(shard.keys() ^ first.keys())}"
            )
    if len(shards) == 1:
        return first
    merged = {}
    for key in list(first):
        pieces = [shard.pop(key) for shard in shards]
        dim = _shard_dim(key)
        if dim is not None:
            merged[key] = torch.cat(pieces, dim=dim)
        elif all(torch.equal(pieces[0], p) for p in pieces[1:]):
            merged[key] = pieces[0]
        else:
            raise ValueError(f"{files[0]}...: replicated tensor {key!r} differs between shards")
    return merged


def meta_names(n_trunk: int, n_heads: int) -> dict[str, str]:
    """Meta checkpoint key -> MTPModel key."""
    names = {
        "tok_embeddings.weight": "embed_tokens.weight",
        "norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(n_trunk + 1):  # Meta's last `layers` block is head 0
        target = f"layers.{i}" if i < n_trunk else "heads.0"
        names |= {f"layers.{i}.{a}": f"{target}.{b}" for a, b in META_BLOCK.items()}
    for j in range(n_heads - 1):
        names |= {f"extra_heads.{j}.{a}": f"heads.{j + 1}.{b}" for a, b in META_BLOCK.items()}
    return names


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows from Meta's interleaved rotary pairs to HF's rotate-half layout, head by head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_meta(
    path: str, *, n_heads: int | None, dtype, device: torch.device, meta_weights: bool = False
) -> MTPModel:
    """MTPModel from params.json + consolidated.NN.pth (several files: model-parallel shards)."""
    params_path = io_stream.join(path, "params.json")
    params = _read_json(params_path)
    absent = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if absent:
        raise ValueError(f"{params_path}: missing required field(s) {absent}")
    H = params.get("n_future_tokens", 1)
    if n_heads is not None and n_heads != H:
        raise ValueError(
            f"{params_path}: n_future_tokens is {H}, but n_heads={n_heads} was asked for"
        )
    files = sorted(
        (n for n in io_stream.list_dir(path) if PTH.fullmatch(n)),
        key=lambda n: int(PTH.fullmatch(n)[1]),
    )
    stored = None
    if meta_weights and (params.get("vocab_size") or -1) > 0:
        # shapes come from params.json; the weights arrive from rank 0 (a value is >= 1 byte)
        stored = sum(io_stream.file_size(io_stream.join(path, f)) for f in files)
        files = []
    sd = _merge_shards([load_pth(io_stream.join(path, f)) for f in files], files) if files else {}
    sd.pop(
        "rope.freqs", None
    )  # Llama checkpoints carry a rotary table; it is recomputed from rope_theta
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:  # Llama-2 writes -1: the tokenizer decides
        if "tok_embeddings.weight" not in sd:
            raise ValueError(
                f"{params_path}: no vocab_size and no tok_embeddings.weight to take it from"
            )
        vocab_size = sd["tok_embeddings.weight"].shape[0]
    try:
        dim, n_layers, n_attn_heads = (
            int(params["dim"]),
            int(params["n_layers"]),
            int(params["n_heads"]),
        )
        n_kv_heads = int(params.get("n_kv_heads") or n_attn_heads)
        if not 1 <= H <= n_layers:
            raise ValueError(f"n_future_tokens {H} must be between 1 and n_layers {n_layers}")
        config = llama_config(
            vocab_size=int(vocab_size),
            dim=dim,
            n_blocks=n_layers - H + 1,
            n_attn_heads=n_attn_heads,
            n_kv_heads=n_kv_heads,
            ffn_dim=ffn_width(
                dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
            ),
            max_seq_len=int(params.get("max_seq_len", 4096)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            norm_eps=float(params.get("norm_eps", 1e-5)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{params_path}: {exc}") from None
    stored = sum(t.numel() for t in sd.values()) if files else stored
    _check_size(params_path, config, stored, H - 1)
    with init_empty_weights():
        model = MTPModel(config, H)
    if meta_weights and not files:
        return model
    names, shapes = meta_names(n_layers - H, H), _shapes(model)
    _check_keys(path, {k: shapes[v] for k, v in names.items()}, {k: t.shape for k, t in sd.items()})
    tensors = {}
    for key in list(sd):
        t = _place(sd.pop(key), dtype, device)
        if key.endswith("attention.wq.weight"):
            t = permute_rotary(t, n_attn_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_rotary(t, n_kv_heads)
        tensors[names[key]] = t
    model.load_state_dict(tensors, strict=True, assign=True)
    return model if device.type == "meta" else model.to(device)


def _hf_config(path: str):
    """The transformers config in a folder's config.json."""
    config_path = io_stream.join(path, "config.json")
    data = _read_json(config_path)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{config_path}: no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from None


def _llama_config(path: str) -> LlamaConfig:
    """config.json of a folder that must hold a Llama model."""
    config = _hf_config(path)
    if config.model_type != "llama":
        raise ValueError(
            f"{path}/config.json: model_type is {config.model_type!r}; this needs a Llama model"
        )
    return config


def _weight_files(path: str) -> list[str]:
    """Names of an HF folder's weight files: model.safetensors, pytorch_model.bin, or the shards
    an index lists."""
    names = set(io_stream.list_dir(path))
    for index, single in HF_WEIGHTS:
        if index in names:
            index_path = io_stream.join(path, index)
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no weight_map object")
            return list(dict.fromkeys(weight_map.values()))
        if single in names:
            return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or an index)")


def _weight_headers(path: str, extra: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple]]:
    """{tensor name: (weight file, shape)} over an HF folder's weight files (and extra files),
    from safetensors headers and .bin pickles, without reading tensor bytes."""
    headers: dict[str, tuple[str, tuple]] = {}
    for name in [*_weight_files(path), *extra]:
        file = io_stream.join(path, name)
        if name.endswith(".bin"):
            shapes = {k: tuple(t.shape) for k, t in load_pth(file, shapes_only=True).items()}
        else:
            header, _, _ = io_stream.read_safetensors_header(file)
            shapes = {k: tuple(info["shape"]) for k, info in header.items()}
        for key, shape in shapes.items():
            if key in headers:
                raise ValueError(f"{file}: tensor {key!r} is also in {headers[key][0]}")
            headers[key] = (file, shape)
    return headers


def _stored(headers: dict[str, tuple[str, tuple]]) -> int:
    """Values the weight files hold, from their headers."""
    return sum(torch.Size(shape).numel() for _, shape in headers.values())


def _read_tensors(
    headers: dict[str, tuple[str, tuple]], names: dict[str, str], dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """{model key: tensor} for names {file key: model key}, read file by file."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for file_key, model_key in names.items():
        by_file.setdefault(headers[file_key][0], []).append((file_key, model_key))
    out = {}
    if device.type == "meta":  # meta_weights: shapes only, no bytes read
        return {m: torch.empty(headers[f][1], dtype=dtype, device="meta") for f, m in names.items()}
    for file, pairs in by_file.items():
        if file.endswith(".bin"):  # a pickle: every tensor comes along, the unused ones are dropped
            got = load_pth(file)
        else:
            got = io_stream.read_safetensors(file, keys=[k for k, _ in pairs])
        for file_key, model_key in pairs:
            out[model_key] = _place(got.pop(file_key), dtype, device)
    return out


def kit_key(name: str, n_trunk: int) -> str:
    """HF Llama checkpoint name of an MTPModel key of the trunk or head 0 (head 0 = last block)."""
    if name.startswith("heads.0."):
        return f"model.layers.{n_trunk}." + name.removeprefix("heads.0.")
    return name if name.startswith("lm_head.") else "model." + name


def _load_llama_mtp(
    path: str, *, kit: bool, n_heads: int | None, dtype, device: torch.device
) -> MTPModel:
    """MTPModel from the kit's format, or from a plain HF Llama whose last block becomes every head."""
    config = _llama_config(path)
    if config.tie_word_embeddings:
        raise ValueError(f"{path}: tied input/output embeddings are not supported for an MTP model")
    if kit:
        meta_path = io_stream.join(path, MTP_JSON)
        H = _read_json(meta_path).get("n_heads")
        if not isinstance(H, int) or H < 1:
            raise ValueError(f"{meta_path}: n_heads must be a positive integer, got {H!r}")
        if n_heads is not None and n_heads != H:
            raise ValueError(
                f"{meta_path}: the model has {H} heads, but n_heads={n_heads} was asked for"
            )
    elif n_heads is None:
        raise ValueError(
            f"{path} is a plain Hugging Face model: pass n_heads=H to load it as an MTP model "
            "(heads 1..H-1 start as copies of its last block)"
        )
    else:
        H = n_heads
    headers = _weight_headers(path, (HEADS_FILE,) if kit else ())
    config_path = io_stream.join(path, "config.json")
    _check_size(config_path, config, _stored(headers), H - 1 if kit else 0)
    if not kit:  # heads 1..H-1 are copies, not in the files
        _check_size(config_path, config, None, H - 1)
    with init_empty_weights():
        model = MTPModel(config, H)
    n_trunk, shapes = len(model.layers), _shapes(model)
    extra_heads = [k for k in shapes if k.startswith("heads.") and not k.startswith("heads.0.")]
    names = {kit_key(k, n_trunk): k for k in shapes if k not in extra_heads}
    if kit:
        names |= {k: k for k in extra_heads}
    _check_keys(
        path, {k: shapes[v] for k, v in names.items()}, {k: s for k, (_, s) in headers.items()}
    )
    tensors = _read_tensors(headers, names, dtype, device)
    if not kit:
        for key in extra_heads:
            tensors[key] = tensors["heads.0." + key.split(".", 2)[2]].clone()
    model.load_state_dict(tensors, strict=True, assign=True)
    return model if device.type == "meta" else model.to(device)


def _load_causal(path: str, *, dtype, device: torch.device) -> nn.Module:
    """AutoModelForCausalLM from an HF folder, weights streamed into a model built without them."""
    config, headers = _hf_config(path), _weight_headers(path)
    _check_size(io_stream.join(path, "config.json"), config, _stored(headers))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes = _shapes(model)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in headers
    expected = {k: s for k, s in shapes.items() if not (tied and k == "lm_head.weight")}
    _check_keys(path, expected, {k: s for k, (_, s) in headers.items()})
    tensors = _read_tensors(headers, {k: k for k in expected}, dtype, device)
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if tied:
        model.tie_weights()
    return model if device.type == "meta" else model.to(device)


def _load_reward(path: str, *, dtype, device: torch.device) -> RewardModel:
    """RewardModel from an HF LlamaForSequenceClassification (score.weight) or Starling-RM (v_head.weight)."""
    config, headers = _llama_config(path), _weight_headers(path)
    _check_size(io_stream.join(path, "config.json"), config, _stored(headers))
    with init_empty_weights():
        model = RewardModel(config)
    shapes = _shapes(model)
    trunk = [k.removeprefix("model.") for k in shapes if k.startswith("model.")]
    ignored: set[str] = set()
    if "score.weight" in headers:
        names = {k: k for k in shapes}
    elif "v_head.weight" in headers:
        prefix = next((p for p in STARLING_PREFIXES if p + "embed_tokens.weight" in headers), None)
        if prefix is None:
            raise ValueError(
                f"{path}: has v_head.weight but no Llama trunk under any of {STARLING_PREFIXES}"
            )
        names = {prefix + k: "model." + k for k in trunk} | {"v_head.weight": "score.weight"}
        # the trunk's alias and the unused LM head of Starling's GPTRewardModel are skipped, not read
        ignored = {p + k for p in STARLING_PREFIXES if p != prefix for k in trunk}
        ignored |= {"lm_head.weight", "model.lm_head.weight"}
    else:
        raise ValueError(
            f"{path}: kind='reward' needs score.weight (sequence classification) or v_head.weight "
            "(Starling-RM); the weights have neither"
        )
    found = {k: s for k, (_, s) in headers.items() if k not in ignored}
    _check_keys(path, {k: shapes[v] for k, v in names.items()}, found)
    model.load_state_dict(_read_tensors(headers, names, dtype, device), strict=True, assign=True)
    return model if device.type == "meta" else model.to(device)


# ---------------------------------------------------------------------------------------------
# Saving


def save_model(model: MTPModel, path: str, tokenizer: Tokenizer | None = None) -> None:
    """Write the kit's format: HF Llama folder (trunk + head 0), extra heads, tokenizer, mtp.json last."""
    _, path = io_stream.resolve(path)
    marker = io_stream.join(path, MTP_JSON)
    if io_stream.exists(marker):  # an interrupted overwrite must not look complete
        io_stream.remove(marker)
    n_trunk = len(model.layers)
    main, extra = {}, {}
    for name, t in model.state_dict().items():
        if name.startswith("heads.") and not name.startswith("heads.0."):
            extra[name] = t
        else:
            main[kit_key(name, n_trunk)] = t
    io_stream.write_safetensors(main, io_stream.join(path, "model.safetensors"), {"format": "pt"})
    io_stream.write_safetensors(extra, io_stream.join(path, HEADS_FILE), {"format": "pt"})
    config = model.config.to_dict()
    config |= {
        "architectures": ["LlamaForCausalLM"],
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    }
    if tokenizer is not None:  # generation stops at the tokenizer's real EOS
        config |= {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    io_stream.write_bytes(
        json.dumps(config, indent=2).encode(), io_stream.join(path, "config.json")
    )
    special = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    io_stream.write_bytes(
        GenerationConfig(**special).to_json_string().encode(),
        io_stream.join(path, "generation_config.json"),
    )
    for name, data in (tokenizer.files() if tokenizer is not None else {}).items():
        io_stream.write_bytes(data, io_stream.join(path, name))
    marker_data = {"format": "wmtp-mtp/1", "n_heads": model.n_heads, "saved_at": time.time()}
    io_stream.write_bytes(json.dumps(marker_data).encode(), marker)
