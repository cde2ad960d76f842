"""MTP model, loaders and tokenizers, checked against independent computations."""

import json
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    tiny_llama_config,
    write_hf_llama,
    write_meta_native,
    write_reward_model,
    write_sentencepiece,
)
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)

import io_stream
from wmtp_model import (
    MTPModel,
    Tokenizer,
    byte_tokenizer,
    ffn_width,
    init_mtp_model,
    load_model,
    load_tokenizer,
    same_tokenizer,
    save_model,
    weights_nbytes,
)


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
    assert same_tokenizer(tok, byte_tokenizer())


# ---------------------------------------------------------------------------------------------
# Meta native: an independent plain-PyTorch forward of the published architecture


def meta_reference_logits(sd: dict, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """[B,S,H,V] logits of Meta's MTP Llama, computed in float64 straight from its state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    dim, n_layers, nh = params["dim"], params["n_layers"], params["n_heads"]
    nkv, H = params.get("n_kv_heads", nh), params.get("n_future_tokens", 1)
    eps, hd = params["norm_eps"], dim // nh
    B, S = ids.shape
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    angles = torch.outer(torch.arange(S).double(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [S, hd/2] complex128
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(
        x,
    ):  # x [B,S,h,hd]: elements (2i, 2i+1) form the complex number rotated by freqs_cis[:, i]
        xc = torch.view_as_complex(x.reshape(B, S, x.shape[2], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).reshape(x.shape)

    def block(x, p):
        h = rmsnorm(x, p["attention_norm.weight"])
        q = rotary((h @ p["attention.wq.weight"].T).view(B, S, nh, hd))
        k = rotary((h @ p["attention.wk.weight"].T).view(B, S, nkv, hd))
        v = (h @ p["attention.wv.weight"].T).view(B, S, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, dim)
        x = x + att @ p["attention.wo.weight"].T
        h = rmsnorm(x, p["ffn_norm.weight"])
        ffn = F.silu(h @ p["feed_forward.w1.weight"].T) * (h @ p["feed_forward.w3.weight"].T)
        return x + ffn @ p["feed_forward.w2.weight"].T

    def sub(prefix):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    n_trunk = n_layers - H
    x = sd["tok_embeddings.weight"][ids]
    for i in range(n_trunk):
        x = block(x, sub(f"layers.{i}."))
    heads = [sub(f"layers.{n_trunk}."), *(sub(f"extra_heads.{j}.") for j in range(H - 1))]
    return torch.stack(
        [rmsnorm(block(x, p), sd["norm.weight"]) @ sd["output.weight"].T for p in heads], dim=2
    )


IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "H, shards, n_kv_heads, extra",
    [
        (1, 1, None, {}),
        (4, 1, 2, {}),
        (4, 2, 2, {"rope_freqs": True, "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0}),
    ],
)
def test_meta_native_matches_reference_forward(tmp_path, H, shards, n_kv_heads, extra):
    folder = str(tmp_path / "meta")
    written = write_meta_native(folder, H=H, shards=shards, n_kv_heads=n_kv_heads, **extra)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    if shards == 1:  # the reference reads the raw file; sharded, it reads what was split
        written = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    model = load_model(folder)
    assert isinstance(model, MTPModel) and model.n_heads == H
    assert len(model.layers) == params["n_layers"] - H
    logits = model(IDS)
    assert logits.shape == (2, 11, H, 259)
    torch.testing.assert_close(
        logits.double(), meta_reference_logits(written, params, IDS), rtol=1e-4, atol=1e-4
    )


def test_meta_native_sharded_from_s3_equals_local(tmp_path, s3):
    written = write_meta_native(s3 + "/meta", H=2, shards=2, seed=3)
    model = load_model(s3 + "/meta", dtype=torch.float32)
    params = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "n_future_tokens": 2}
    truth = meta_reference_logits(written, params | {"norm_eps": 1e-5, "rope_theta": 10000.0}, IDS)
    torch.testing.assert_close(model(IDS).double(), truth, rtol=1e-4, atol=1e-4)
    assert same_tokenizer(load_tokenizer(s3 + "/meta"), byte_tokenizer())


def test_loading_from_s3_makes_no_temp_files(s3, monkeypatch):
    write_meta_native(s3 + "/meta", H=2, shards=2)
    write_hf_llama(s3 + "/hf")

    def refuse(*args, **kwargs):
        raise AssertionError("the loader made a temp file")

    for name in (
        "mkstemp",
        "mkdtemp",
        "NamedTemporaryFile",
        "TemporaryFile",
        "SpooledTemporaryFile",
    ):
        monkeypatch.setattr(tempfile, name, refuse)
    assert load_model(s3 + "/meta").n_heads == 2
    assert load_model(s3 + "/hf", n_heads=2).n_heads == 2


def test_bin_shapes_come_from_the_pickle_alone(s3, tmp_path):
    # meta_weights ranks and the FSDP size rule read only the pickle, never the tensor bytes
    state = write_reward_model(s3 + "/rm", "starling", weights="bin", dim=256, ffn_dim=512)
    write_reward_model(str(tmp_path), "starling", weights="safetensors", dim=256, ffn_dim=512)
    fetched = []

    def record(request, **kwargs):
        first, last = request.headers["Range"].decode().removeprefix("bytes=").split("-")
        fetched.append(int(last) - int(first) + 1)

    io_stream.s3_filesystem().s3.meta.events.register("before-send.s3.GetObject", record)
    size = io_stream.file_size(s3 + "/rm/pytorch_model.bin")
    rm = load_model(s3 + "/rm", kind="reward", meta_weights=True)
    assert all(p.is_meta for p in rm.parameters())
    nbytes = weights_nbytes(s3 + "/rm")
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    # small reads of the zip's directory and each record's header through a 64 KiB buffer; a
    # tensor's bytes would come as one large read
    assert max(fetched) <= 2**16 and sum(fetched) <= (len(unique) + 8) * 2**16, fetched
    assert sum(fetched) < size / 2, (sum(fetched), size)
    # the trunk is stored once (aliases share storage), so the .bin holds about half of what the
    # safetensors copy does; the size rule counts what the file holds
    assert sum(unique.values()) <= nbytes <= sum(unique.values()) + 2**16
    assert weights_nbytes(str(tmp_path)) == sum(t.nbytes for t in state.values())


def test_dtype_argument_casts_while_loading(tmp_path):
    write_meta_native(str(tmp_path), H=2)
    model = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(IDS).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 2])
def test_hf_llama_as_causal_and_as_mtp(tmp_path, shards, weights):
    folder = str(tmp_path / "hf")
    write_hf_llama(folder, shards=shards, weights=weights)
    truth = LlamaForCausalLM.from_pretrained(folder).eval()(IDS).logits
    causal = load_model(folder, kind="causal").eval()
    assert isinstance(causal, LlamaForCausalLM)
    torch.testing.assert_close(causal(IDS).logits, truth, rtol=1e-5, atol=1e-5)
    mtp = load_model(folder, n_heads=3)
    assert (len(mtp.layers), mtp.n_heads) == (2, 3)
    logits = mtp(IDS)
    for k in range(3):  # every head starts as a copy of the last block
        torch.testing.assert_close(logits[:, :, k], truth, rtol=1e-5, atol=1e-5)
    assert mtp.heads[1].mlp.up_proj.weight.data_ptr() != mtp.heads[0].mlp.up_proj.weight.data_ptr()


def test_hf_causal_with_tied_embeddings(tmp_path):
    write_hf_llama(str(tmp_path), tie=True)
    truth = LlamaForCausalLM.from_pretrained(str(tmp_path))(IDS).logits
    model = load_model(str(tmp_path), kind="causal")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model(IDS).logits, truth, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The kit's own format


def test_save_model_loads_as_hf_next_token_model_and_round_trips(tmp_path, root):
    write_meta_native(str(tmp_path / "meta"), H=4)
    model = load_model(str(tmp_path / "meta"))
    tok = load_tokenizer(str(tmp_path / "meta"))
    save_model(model, root, tokenizer=tok)
    assert {"config.json", "model.safetensors", "mtp_heads.safetensors", "mtp.json"} <= set(
        io_stream.list_dir(root)
    )
    again = load_model(root)
    assert again.n_heads == 4 and again.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert same_tokenizer(load_tokenizer(root), tok)
    if root.startswith("s3://"):
        return
    hf = AutoModelForCausalLM.from_pretrained(root)
    torch.testing.assert_close(hf(IDS).logits, model(IDS)[:, :, 0], rtol=1e-5, atol=1e-5)
    causal = load_model(root, kind="causal")
    torch.testing.assert_close(causal(IDS).logits, model(IDS)[:, :, 0], rtol=1e-5, atol=1e-5)


def test_save_model_of_a_fresh_bf16_model(tmp_path):
    model = init_mtp_model(
        vocab_size=259, dim=32, n_layers=3, n_heads=2, n_attn_heads=4, dtype=torch.bfloat16
    )
    save_model(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    again = load_model(str(tmp_path))
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(again(IDS), model(IDS))


# ---------------------------------------------------------------------------------------------
# Reward models


def test_seqcls_reward_equals_transformers(tmp_path):
    write_reward_model(str(tmp_path), "seqcls")
    rm = load_model(str(tmp_path), kind="reward")
    ids = IDS.clone()
    ids[1, 7:] = 258  # right padding with the config's pad_token_id
    mask = (ids != 258).long()
    truth = LlamaForSequenceClassification.from_pretrained(str(tmp_path))(
        ids, attention_mask=mask
    ).logits
    rewards = rm(ids, mask)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, truth[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_starling_reward_from_s3_follows_its_model_card(s3, weights):
    state = write_reward_model(s3 + "/rm", "starling", seed=5, weights=weights)
    rm = load_model(s3 + "/rm", kind="reward")
    ids = IDS.clone()
    ids[0, 4:] = 258
    # the model card: v_head on the transformer's last hidden state, at the token before the first pad
    trunk = LlamaModel(tiny_llama_config())
    trunk.load_state_dict(
        {
            k.removeprefix("transformer."): v
            for k, v in state.items()
            if k.startswith("transformer.")
        }
    )
    hidden = trunk(ids, attention_mask=(ids != 258).long()).last_hidden_state
    truth = torch.stack(
        [hidden[0, 3] @ state["v_head.weight"][0], hidden[1, 10] @ state["v_head.weight"][0]]
    )
    torch.testing.assert_close(rm(ids, (ids != 258).long()), truth, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def sp_bytes(tmp_path_factory):
    """A SentencePiece model trained here on a few KB of code."""
    return write_sentencepiece(str(tmp_path_factory.mktemp("sp")))


def test_sentencepiece_local_and_s3(tmp_path, s3, sp_bytes):
    import sentencepiece as spm

    for folder in (str(tmp_path), s3 + "/tok"):
        io_stream.write_bytes(sp_bytes, io_stream.join(folder, "tokenizer.model"))
    local, remote = load_tokenizer(str(tmp_path)), load_tokenizer(s3 + "/tok/tokenizer.model")
    truth = spm.SentencePieceProcessor(model_proto=sp_bytes)
    text = "def fib(n):    return n if n < 2 else fib(n - 1) + fib(n - 2)"
    assert local.encode(text) == truth.encode(text) and remote.encode(text) == truth.encode(text)
    assert local.decode(local.encode(text)) == text
    assert (local.bos_id, local.eos_id, local.pad_id, local.vocab_size) == (1, 2, 3, 120)
    assert same_tokenizer(local, remote)
    other = load_tokenizer(write_sentencepiece_file(tmp_path / "other", vocab_size=100))
    assert not same_tokenizer(local, other)
    assert not same_tokenizer(local, byte_tokenizer())


def test_a_continuation_keeps_the_space_its_first_token_starts_with(tmp_path, sp_bytes):
    """decode_after(prompt, new) is the full text less the prompt's text, at every split of a
    line: SentencePiece's decode of `new` alone drops the space its first token starts with
    (a completion's indentation), and the byte tokenizer and the tokenizer.json twin agree."""
    io_stream.write_bytes(sp_bytes, io_stream.join(str(tmp_path), "tokenizer.model"))
    sp = load_tokenizer(str(tmp_path))
    twin = Tokenizer("tokenizer.json", sp.files()["tokenizer.json"], source="twin")
    text = "def fib(n):    return n if n < 2 else fib(n - 1) + fib(n - 2)"
    lost = 0
    for tok in (sp, twin, byte_tokenizer()):
        ids = tok.encode(text)
        for k in range(1, len(ids)):
            want = text[len(tok.decode(ids[:k])) :]  # the prompt's text is a prefix of the line
            assert tok.decode(ids[:k]) == text[: len(text) - len(want)]
            assert tok.decode_after([tok.bos_id, *ids[:k]], ids[k:]) == want
            lost += tok.decode(ids[k:]) != want
    assert lost > 0  # decoding alone loses spaces: what decode_after is for
    assert sp.decode_after([sp.bos_id], sp.encode(" x")) == sp.decode(sp.encode(" x"))


def write_sentencepiece_file(folder, **kw) -> str:
    write_sentencepiece(str(folder), **kw)
    return str(folder / "tokenizer.model")


def test_tokenizer_json_specials_come_from_tokenizer_config(tmp_path):
    base = byte_tokenizer()
    (tmp_path / "tokenizer.json").write_bytes(base.data)
    config = {"bos_token": {"content": "</s>"}, "eos_token": "<pad>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (257, 258, 258)  # no pad token: eos
    assert not same_tokenizer(tok, base)
    assert load_tokenizer(None).encode("ab") == [97, 98]


# ---------------------------------------------------------------------------------------------
# Errors


def rewrite_pth(folder, change):
    path = folder / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    write_meta_native(str(tmp_path), H=2)
    rewrite_pth(tmp_path, lambda sd: sd.pop("extra_heads.0.feed_forward.w2.weight"))
    with pytest.raises(
        ValueError, match=r"missing 1 tensor\(s\): extra_heads.0.feed_forward.w2.weight"
    ):
        load_model(str(tmp_path))
    rewrite_pth(
        tmp_path,
        lambda sd: sd.update({"extra_heads.0.feed_forward.w2.weight": torch.zeros(64, 192)}),
    )
    rewrite_pth(
        tmp_path, lambda sd: sd.update({"extra_heads.1.attention.wq.weight": torch.zeros(64, 64)})
    )
    with pytest.raises(
        ValueError, match=r"unexpected 1 tensor\(s\): extra_heads.1.attention.wq.weight"
    ):
        load_model(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tmp_path):
    state = write_hf_llama(str(tmp_path))
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    io_stream.write_safetensors(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"shape mismatch.*model.layers.1.mlp.down_proj.weight \(64, 95\) vs \(64, 96\)",
    ):
        load_model(str(tmp_path), kind="causal")


def test_params_json_without_a_required_field(tmp_path):
    write_meta_native(str(tmp_path), H=1)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["dim"]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params.json: missing required field\(s\) \['dim'\]"):
        load_model(str(tmp_path))


def test_empty_and_unrelated_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no model found \(files: notes.txt, params.json\)"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_wrong_kind_or_heads_are_refused(tmp_path):
    meta, hf, rm = tmp_path / "meta", tmp_path / "hf", tmp_path / "rm"
    write_meta_native(str(meta), H=2)
    write_hf_llama(str(hf))
    with pytest.raises(ValueError, match="kind must be one of"):
        load_model(str(meta), kind="value")
    with pytest.raises(ValueError, match="loads only as kind='mtp'"):
        load_model(str(meta), kind="causal")
    with pytest.raises(ValueError, match="n_future_tokens is 2, but n_heads=4"):
        load_model(str(meta), n_heads=4)
    with pytest.raises(ValueError, match="pass n_heads=H"):
        load_model(str(hf))
    with pytest.raises(ValueError, match="needs score.weight .* or v_head.weight"):
        load_model(str(hf), kind="reward")
    write_reward_model(str(rm), "seqcls")
    (rm / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!")
    with pytest.raises(ValueError, match="model.safetensors: safetensors header is not JSON"):
        load_model(str(rm), kind="reward")


def test_corrupt_pth_is_a_clear_error(tmp_path):
    write_meta_native(str(tmp_path), H=1)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match=r"consolidated.00.pth: not a weights-only PyTorch checkpoint"
    ):
        load_model(str(tmp_path))
