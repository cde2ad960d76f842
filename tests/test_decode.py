"""Greedy and self-speculative decoding, checked against a cache-free argmax loop and a known corpus;
the static-cache path (compile=True) against the eager one."""

import functools
import os

import msgspec
import pytest
import torch
from transformers import DynamicCache

import wmtp
import wmtp_decode
from wmtp_decode import decode_step, greedy_decode, greedy_decode_batch, static_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"  # 50 bytes, repeated


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CI machine is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_model(n_heads: int, seed: int = 0):
    """A random fp32 GQA model (4 attention heads, 2 KV heads) with a small vocabulary."""
    return wmtp.init_mtp_model(
        vocab_size=13,
        dim=32,
        n_layers=n_heads + 2,
        n_heads=n_heads,
        n_attn_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        seed=seed,
    )


def naive_greedy(model, prompt: list[int], n: int, eos_id: int | None = None) -> list[int]:
    """Argmax of head 0 at the last position of a full, cache-free forward, one token at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1, 0].argmax()))
            if ids[-1] == eos_id:
                break
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def corpus_model():
    """A tiny 4-head model trained with wmtp.mtp_loss on the repeated CORPUS until its heads know it."""
    tok = wmtp.byte_tokenizer()
    text = torch.tensor(tok.encode(CORPUS * 3))
    model = wmtp.init_mtp_model(
        vocab_size=tok.vocab_size,
        dim=64,
        n_layers=6,
        n_heads=4,
        n_attn_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        seed=0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(CORPUS), (8,), generator=g).tolist()
        x = torch.stack([text[s : s + 48] for s in starts])
        labels = wmtp.mtp_targets(x, torch.ones_like(x, dtype=torch.bool), 4)
        loss, _ = wmtp.mtp_loss(model, x, labels, checkpoint_heads=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), text.tolist()


def test_cached_trunk_and_heads_equal_the_full_forward():
    model = random_model(4)
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = DynamicCache()
    logits = []
    with torch.no_grad():
        for a, b in [(0, 5), (5, 6), (6, 9)]:  # a prefill, one token, then three at once
            pos = torch.arange(a, b).unsqueeze(0)
            hidden, ctx = model.run_trunk(ids[:, a:b], cache=cache, position_ids=pos)
            logits.append(
                torch.stack([model.lm_head(model.run_head(k, hidden, ctx)) for k in range(4)], 2)
            )
    assert len(cache.layers) == len(model.layers) + 4  # the trunk's layers, then one per head
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_plain_and_speculative_equal_a_cache_free_argmax_loop(n_heads):
    model = random_model(n_heads, seed=n_heads)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = naive_greedy(model, prompt, 40)
    assert greedy_decode(model, prompt, 40) == (expected, 40)  # one forward per token
    stats = {}
    out, forwards = greedy_decode(model, prompt, 40, speculative=True, stats=stats)
    assert out == expected
    assert forwards == stats["forwards"] <= 40
    assert stats["tokens"] == 40 and len(stats["head_acceptance"]) == n_heads - 1


@pytest.mark.parametrize("speculative", [False, True])
def test_batch_rows_of_different_lengths_decode_as_alone(speculative):
    model = random_model(4, seed=7)
    prompts = [[5, 2], [1, 2, 3, 4, 5, 6, 7], [11]]
    alone = [naive_greedy(model, p, 30) for p in prompts]
    outs, stats = greedy_decode_batch(model, prompts, 30, speculative=speculative)
    assert outs == alone
    # an eos that one row emits early: that row stops, the others go on
    eos = alone[0][3]
    alone = [naive_greedy(model, p, 30, eos_id=eos) for p in prompts]
    assert len({len(a) for a in alone}) > 1
    outs, _ = greedy_decode_batch(model, prompts, 30, speculative=speculative, eos_id=eos)
    assert outs == alone


def test_speculative_equals_a_cache_free_loop_at_the_default_config_shape():
    m = wmtp.load_config(os.path.join(ROOT, "config.yaml")).model
    model = wmtp.init_mtp_model(**msgspec.structs.asdict(m))
    tok = wmtp.byte_tokenizer()
    prompts = [[tok.bos_id, *tok.encode("def f(x):\n")], [tok.bos_id, *tok.encode("# sort")]]
    alone = [naive_greedy(model, p, 24) for p in prompts]
    assert greedy_decode_batch(model, prompts, 24, speculative=True)[0] == alone
    assert greedy_decode(model, prompts[0], 24, speculative=True)[0] == alone[0]


def test_trained_heads_decode_the_corpus_in_few_forwards(corpus_model):
    model, text = corpus_model
    prompt, truth = text[5:15], text[15:51]  # the corpus itself says what greedy must produce
    assert greedy_decode(model, prompt, 36) == (truth, 36)
    stats = {}
    out, forwards = greedy_decode(model, prompt, 36, speculative=True, stats=stats)
    assert out == truth
    assert forwards * 2.5 <= 36
    assert stats["tokens_per_forward"] >= 2.5
    assert len(stats["head_acceptance"]) == 3 and min(stats["head_acceptance"]) >= 0.8
    assert stats["accepted"][0] >= stats["accepted"][1] >= stats["accepted"][2] > 0


def test_eos_inside_an_accepted_draft_and_max_new_tokens_mid_draft(corpus_model):
    model, text = corpus_model
    prompt = text[:12]
    full = naive_greedy(model, prompt, 24)
    # heads 1..3 are accepted at the second forward, so tokens 1-3 come from drafts
    assert greedy_decode(model, prompt, 24, speculative=True)[1] <= 24 // 3
    for n in range(1, 25):
        assert greedy_decode(model, prompt, n, speculative=True)[0] == full[:n]
    for i, tok in enumerate(full):
        if tok not in full[:i]:  # first occurrence: decoding with eos_id=tok stops right after it
            out, forwards = greedy_decode(model, prompt, 24, speculative=True, eos_id=tok)
            assert out == full[: i + 1]
            assert forwards <= i + 1


def test_batched_speculative_rows_accept_different_lengths(corpus_model):
    model, text = corpus_model
    prompts = [text[3:20], [7, 200, 100, 9], text[30:34]]
    solo = []
    for p in prompts:
        stats = {}
        out, _ = greedy_decode(model, p, 30, speculative=True, stats=stats)
        assert out == naive_greedy(model, p, 30)
        solo.append(stats)
    assert solo[0]["head_acceptance"] != solo[1]["head_acceptance"]
    outs, stats = greedy_decode_batch(model, prompts, 30, speculative=True)
    assert outs == [naive_greedy(model, p, 30) for p in prompts]
    assert stats["row_forwards"] == sum(s["forwards"] for s in solo)
    assert stats["forwards"] == max(s["forwards"] for s in solo)
    assert stats["tokens"] == 90


def test_bad_input_and_zero_tokens():
    model = random_model(2)
    assert greedy_decode(model, [1, 2], 0, speculative=True) == ([], 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_decode_batch(model, [[1], []], 4)
    with pytest.raises(ValueError, match="prompt 0 has token id 13 outside"):
        greedy_decode(model, [1, 13], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        greedy_decode(model, [1], -1)


def test_generate_speculative_equals_transformers_generate(corpus_model):
    model, text = corpus_model
    tok = wmtp.byte_tokenizer()
    prompts = [CORPUS[:7], CORPUS[10:30], "zzz", CORPUS[3:5]]
    stop = ("\nprint(",)
    plain = wmtp.generate(model, tok, prompts, max_new_tokens=40, stop=stop, batch_size=3)
    stats: dict = {}
    spec = wmtp.generate(
        model,
        tok,
        prompts,
        max_new_tokens=40,
        stop=stop,
        batch_size=3,
        speculative=True,
        stats=stats,
    )
    assert spec == plain
    assert stats["tokens_per_forward"] > 2.0 and len(stats["head_acceptance"]) == 3
    with pytest.raises(ValueError, match="greedy"):
        wmtp.generate(model, tok, prompts, temperature=0.5, speculative=True)


# The static cache and the compiled forward (compile=True): the same tokens and statistics as the
# eager path. The static path runs eagerly first (cheap, every case), then compiled (one compile
# per model and shape: ~5 s each on CPU, fewer with inductor's on-disk cache warm).


@pytest.fixture
def no_eager_fallback():
    """Fail rather than quietly run eagerly once dynamo's recompile limit is reached."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


CASES = [  # (n_heads, prompts, max_new_tokens, eos_id)
    (1, [[3, 1, 4, 1, 5, 9, 2, 6]], 40, None),
    (2, [[3, 1, 4, 1, 5, 9, 2, 6]], 40, None),
    (4, [[3, 1, 4, 1, 5, 9, 2, 6]], 40, None),
    (4, [[5, 2], [1, 2, 3, 4, 5, 6, 7], [11]], 30, None),
    (4, [[5, 2], [1, 2, 3, 4, 5, 6, 7], [11]], 30, 2),  # rows stop at different steps
    (4, [[7, 7, 1]], 3, None),  # max_new_tokens inside the first draft
    (2, [[1] * 300, [2, 3]], 9, 8),  # a prompt longer than one CACHE_ROUND
]


@pytest.mark.parametrize("one_read", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_static_cache_path_equals_the_eager_one(case, one_read):
    n_heads, prompts, n, eos = CASES[case]
    model = random_model(n_heads, seed=case)
    step = functools.partial(decode_step, one_read=one_read)
    for speculative in (False, True):
        eager = greedy_decode_batch(model, prompts, n, speculative=speculative, eos_id=eos)
        assert static_decode(model, prompts, n, speculative, eos, step) == eager
    assert eos is None or len({len(o) for o in eager[0]}) > 1  # eos did stop a row early


def test_static_cache_is_reused_and_needs_no_reset():
    model = random_model(4, seed=3)
    long, short = [list(range(1, 13)) * 3], [[9, 8]]
    step = functools.partial(decode_step, one_read=True)
    first = static_decode(model, long, 20, True, None, step)
    cache = wmtp_decode.LAST_CACHE.copy()
    # the short prompt's slots still hold the long one's keys: they are above its positions
    assert static_decode(model, short, 20, True, None, step) == greedy_decode_batch(
        model, short, 20, speculative=True
    )
    assert wmtp_decode.LAST_CACHE == cache and len(cache) == 1
    assert static_decode(model, long, 20, True, None, step) == first
    zero = greedy_decode_batch(model, long, 0, speculative=True)
    assert static_decode(model, long, 0, True, None, step) == zero


def test_static_path_at_the_default_config_shape():
    m = wmtp.load_config(os.path.join(ROOT, "config.yaml")).model
    model = wmtp.init_mtp_model(**msgspec.structs.asdict(m))
    tok = wmtp.byte_tokenizer()
    prompts = [[tok.bos_id, *tok.encode("def f(x):\n")], [tok.bos_id, *tok.encode("# sort")]]
    for speculative in (False, True):
        eager = greedy_decode_batch(model, prompts, 24, speculative=speculative)
        assert static_decode(model, prompts, 24, speculative, None, decode_step) == eager


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_compiled_equals_eager(n_heads, no_eager_fallback):
    model = random_model(n_heads, seed=n_heads)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for speculative in (False, True):
        stats, compiled_stats = {}, {}
        eager = greedy_decode(model, prompt, 40, speculative=speculative, stats=stats)
        compiled = greedy_decode(
            model, prompt, 40, speculative=speculative, stats=compiled_stats, compile=True
        )
        assert compiled == eager and compiled_stats == stats
        assert eager[0] == naive_greedy(model, prompt, 40)


def test_compiled_batches_equal_eager(no_eager_fallback):
    model = random_model(4, seed=7)
    prompts = [[5, 2], [1, 2, 3, 4, 5, 6, 7], [11]]
    for speculative in (False, True):
        for eos in (None, 12):  # eos 12: rows stop at different steps, the batch keeps its shape
            eager = greedy_decode_batch(model, prompts, 30, speculative=speculative, eos_id=eos)
            compiled = greedy_decode_batch(
                model, prompts, 30, speculative=speculative, eos_id=eos, compile=True
            )
            assert compiled == eager
    assert len({len(o) for o in eager[0]}) > 1  # eos 12 did stop rows early


def test_one_read_step_traces_whole(no_eager_fallback):
    """The GPU's default unembedding (every head at every fed token in one matmul) is captured as
    one graph; aot_eager: on a GPU inductor emits Triton, not the C++ this CPU would compile."""
    model = random_model(4, seed=4)
    prompts = [[5, 2], [1, 2, 3, 4, 5, 6, 7]]
    step = functools.partial(decode_step, one_read=True)
    step = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    eager = greedy_decode_batch(model, prompts, 30, speculative=True, eos_id=2)
    assert static_decode(model, prompts, 30, True, 2, step) == eager


def stat_sums(solo: list[dict]) -> dict:
    """The counts of several decodes added up, and the ratios they give."""
    summed = {
        "proposed": [sum(k) for k in zip(*(s["proposed"] for s in solo))],
        "accepted": [sum(k) for k in zip(*(s["accepted"] for s in solo))],
        **{key: sum(s[key] for s in solo) for key in ("tokens", "row_forwards")},
    }
    summed["tokens_per_forward"] = summed["tokens"] / summed["row_forwards"]
    pairs = zip(summed["accepted"], summed["proposed"])
    summed["head_acceptance"] = [a / p if p else 0.0 for a, p in pairs]
    return summed


@pytest.mark.parametrize("mode", ["eager", "static", "compiled"])
def test_speculative_stats_count_only_drafts_a_row_can_use(corpus_model, mode, request):
    """Drafts past a row's max_new_tokens or after its EOS are not counted, so a batch's
    statistics are the sums of its prompts' own (the old counts failed this at n=10 and 23)."""
    if mode == "compiled":
        request.getfixturevalue("no_eager_fallback")
    model, text = corpus_model
    step = functools.partial(decode_step, one_read=True)  # the GPU's default, run eagerly

    def decode(prompts, n, eos):
        if mode == "static":
            return static_decode(model, prompts, n, True, eos, step)
        kwargs = {"eos_id": eos, "compile": mode == "compiled"}
        return greedy_decode_batch(model, prompts, n, speculative=True, **kwargs)

    # alone: the second forward feeds 3 drafts and accepts all (tokens 1-3 come from drafts)
    prompt, full = text[:12], naive_greedy(model, text[:12], 24)
    for j in (1, 2, 3):
        assert full[j] not in full[:j]
        out, stats = decode([prompt], 24, full[j])  # eos is draft j: drafts after it unused
        assert out == [full[: j + 1]] and stats["forwards"] == 2
        assert stats["proposed"] == stats["accepted"] == [1] * j + [0] * (3 - j)
        out, stats = decode([prompt], j + 1, None)  # j tokens left: j - 1 drafts can save one
        assert out == [full[: j + 1]] and stats["forwards"] == 2
        assert stats["proposed"] == stats["accepted"] == [1] * (j - 1) + [0] * (4 - j)
    # together: rows of different lengths, eos 41 ")" stopping some, n cutting inside drafts
    prompts = [text[3:20], [7, 200, 100, 9], text[30:34], text[41:43], text[10:11], [120, 3, 50]]
    for n, eos in ((23, 41), (10, None)):
        solo = [decode([p], n, eos) for p in prompts]
        outs, stats = decode(prompts, n, eos)
        assert outs == [o[0] for o, _ in solo]
        if eos is not None:
            assert min(map(len, outs)) < n == max(map(len, outs))  # eos stopped rows early
        summed = stat_sums([s for _, s in solo])
        assert {key: stats[key] for key in summed} == summed
        assert stats["forwards"] == max(s["forwards"] for _, s in solo)
        if mode == "eager":  # the tokens are plain greedy's
            assert outs == greedy_decode_batch(model, prompts, n, eos_id=eos)[0]
