"""MTP model, loaders and tokenizers, checked against independent computations."""

import torch

import wmtp_model
from wmtp_model import MTPModel, byte_tokenizer, ffn_width, init_mtp_model


def test_ffn_width_matches_published_llama_sizes():
    assert ffn_width(4096) == 11008  # Llama-2 7B
    assert ffn_width(5120) == 13824  # Llama-2 13B
    assert ffn_width(8192, 4096, 1.3) == 28672  # Llama-2 70B


def test_init_mtp_model_layout_and_heads_share_trunk():
    model = init_mtp_model(
        vocab_size=259, dim=32, n_layers=6, n_heads=4, n_attn_heads=4, n_kv_heads=2
    )
    assert isinstance(model, MTPModel)
    assert (len(model.layers), len(model.heads), model.n_heads) == (2, 4, 4)
    assert model.config.num_hidden_layers == 3  # the next-token view: trunk + head 0
    assert model.heads[0].mlp.gate_proj.weight.shape == (
        256,
        32,
    )  # ffn_width(32) with multiple_of 256
    ids = torch.randint(0, 259, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 5, 4, 259)
    hidden, ctx = model.run_trunk(ids)
    for k in range(4):
        assert torch.equal(model.lm_head(model.run_head(k, hidden, ctx)), logits[:, :, k])
    assert model(ids, fn=lambda m, i, a: (m is model, i is ids, a)) == (True, True, None)


def test_right_padding_does_not_change_the_valid_positions():
    model = init_mtp_model(vocab_size=259, dim=32, n_layers=3, n_heads=2, n_attn_heads=2)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.full((1, 3), 258)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    torch.testing.assert_close(model(padded, mask)[:, :6], model(ids), rtol=1e-5, atol=1e-6)


def test_init_dtype_casts_parameters_only():
    model = init_mtp_model(
        vocab_size=259, dim=32, n_layers=2, n_heads=1, n_attn_heads=2, dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_byte_tokenizer_is_utf8_bytes_plus_three_specials():
    tok = byte_tokenizer()
    text = "def f(x):\n\treturn 'héllo' + x  # ✓\r\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text
    assert wmtp_model.same_tokenizer(tok, byte_tokenizer())
