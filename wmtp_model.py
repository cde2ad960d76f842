"""Models and tokenizers: the MTP model (Hugging Face Llama blocks in Meta's layout), one loader
for every supported checkpoint format, `save_model`, and tokenizers.

MTP layout (Gloeckle et al. 2024): the trunk is the embedding and `n_trunk` decoder blocks; each of
the H heads is one decoder block applied to the *same* trunk output; all heads share the final
RMSNorm and the unembedding. Head k at position t predicts token t+k+1.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

# ---------------------------------------------------------------------------------------------
# The MTP model


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
        self.config = (
            config  # num_hidden_layers = n_trunk + 1: the next-token view (trunk + head 0)
        )
        self.n_heads = n_heads
        n_trunk = config.num_hidden_layers - 1
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(n_trunk))
        # layer_idx only matters for a KV cache, which heads never use
        self.heads = nn.ModuleList(LlamaDecoderLayer(config, n_trunk) for _ in range(n_heads))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def run_trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Trunk output [B,S,D] and the context (position embeddings, attention mask) heads need."""
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        ctx = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(hidden, position_ids=position_ids),
        }
        for layer in self.layers:
            hidden = layer(hidden, **ctx)
        return hidden, ctx

    def run_head(self, k: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Head k's final *normed* hidden state [B,S,D] (lm_head of it gives head k's logits)."""
        return self.norm(self.heads[k](hidden, **ctx))

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
    """A randomly initialised MTP model; n_layers counts all blocks as Meta's params.json does
    (n_trunk = n_layers - n_heads trunk blocks plus n_heads head blocks); ffn_dim defaults to
    Meta's formula with multiple_of=256."""
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
        ffn_dim=ffn_dim or ffn_width(dim),
        max_seq_len=max_seq_len,
        rope_theta=rope_theta,
        norm_eps=norm_eps,
    )
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


class Tokenizer:
    """SentencePiece or `tokenizers` tokenizer; keeps its file name and bytes so it can be saved."""

    def __init__(
        self, name: str, data: bytes, *, bos_id: int, eos_id: int, pad_id: int, source: str
    ):
        self.name = name  # file name to save it under: tokenizer.model or tokenizer.json
        self.data = data
        self.source = source
        if name.endswith(".model"):
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_proto=data)
            except Exception as exc:
                raise ValueError(f"{source}: not a SentencePiece model ({exc})") from None
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_str(data.decode())
            except Exception as exc:
                raise ValueError(f"{source}: not a tokenizers JSON file ({exc})") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        for what, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"{source}: {what} id {i} is outside the vocabulary of {self.vocab_size}"
                )
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

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

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


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
    return Tokenizer(
        "tokenizer.json",
        tok.to_str().encode(),
        bos_id=256,
        eos_id=257,
        pad_id=258,
        source="byte_tokenizer()",
    )


SAMPLE_CODE = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "for i in range(10):\n\tprint(f'{i:>3} -> {i ** 2}')  # squares\n"
    'assert add(2, 3) == 5, "ok"\nimport sys; x = {"k": [1, 2.5, None, True]}\n'
)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when vocab size, special ids and the ids of a fixed code sample all agree."""
    return (a.vocab_size, a.bos_id, a.eos_id, a.pad_id) == (
        b.vocab_size,
        b.bos_id,
        b.eos_id,
        b.pad_id,
    ) and a.encode(SAMPLE_CODE) == b.encode(SAMPLE_CODE)
