"""Generation: batched == one-by-one, KV-cached greedy == uncached argmax, per-sample EOS and
max_gen_len, teacher forcing, seeded top-p, streaming."""

from __future__ import annotations

import pytest
import torch

from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.generation import generate_ids, generate_text, iter_tokens, sample_top_p
from ibllm_lab.llama import KVCache, LayerKV
from ibllm_lab.model import ImageBindLLM, format_prompt
from ibllm_lab.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded; two threads on a shared 2-core machine
    spin-wait (measured: test_generation 5 s with one thread, 69 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ENC = 8
CORPUS = [
    "a red circle moves to the left of a blue square",
    "two green triangles are static near the top",
    "the small yellow star is in the corner 42 times",
] * 20 + [format_prompt("Describe the scene."), format_prompt("Count", "2 stars")] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tok", 320))


def make_model(tokenizer, injection="gated", max_batch_size=8, seed=0) -> ImageBindLLM:
    torch.manual_seed(seed)
    llama = LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        vocab_size=tokenizer.n_words,
        multiple_of=16,
        max_seq_len=256,
        max_batch_size=max_batch_size,
    )
    adapter = AdapterConfig(encoder_dim=ENC, query_layer=2, lora_rank=2, injection=injection)
    model = ImageBindLLM(llama, adapter, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight") and "norm_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("gate") else 0.3))
    return model.eval()


PROMPTS = [[1, 17, 40, 41], [1, 9], [1, 100, 7, 8, 30, 31, 60], [1, 200, 201]]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("injection", ["gated", "input_token"])
def test_batched_greedy_with_mixed_prompt_lengths_equals_one_by_one(tokenizer, injection, fast):
    """``fast``: FastGenerator, the default (input_token falls back to the model's modules)."""
    model = make_model(tokenizer, injection)
    feats = torch.randn(len(PROMPTS), ENC)
    options = {"max_gen_len": 12, "temperature": 0, "fast": fast}
    batched = model.generate_ids_from_feats(feats, PROMPTS, **options)
    single = [
        model.generate_ids_from_feats(feats[i : i + 1], [p], **options)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert batched == single
    assert any(len(ids) > 0 for ids in batched)
    texts = model.generate_from_feats(feats, PROMPTS, **options)
    assert texts == [tokenizer.decode(ids) for ids in batched]
    assert model.generate_ids_from_feats(feats, PROMPTS, **options | {"fast": not fast}) == batched


@pytest.mark.parametrize("fast", [True, False])
def test_cached_greedy_equals_uncached_argmax(tokenizer, fast):
    model = make_model(tokenizer)
    feats = torch.randn(1, ENC)
    prompt = PROMPTS[0]
    got = model.generate_ids_from_feats(feats, [prompt], max_gen_len=8, temperature=0, fast=fast)[0]
    seq, want = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model.logits(torch.tensor([seq]), feats)[0, -1].argmax())
            if nxt == tokenizer.eos_id:
                break
            want.append(nxt)
            seq.append(nxt)
    assert got == want


def test_chunks_larger_than_max_batch_size(tokenizer):
    model = make_model(tokenizer, max_batch_size=2)
    feats = torch.randn(len(PROMPTS), ENC)
    got = model.generate_ids_from_feats(feats, PROMPTS, max_gen_len=5, temperature=0)
    single = [
        model.generate_ids_from_feats(feats[i : i + 1], [p], max_gen_len=5, temperature=0)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert got == single


class CountingDecoder:
    """A scripted model: the next token is ``last + 1``; after ``stop`` comes EOS (2).
    Checks that the loop feeds contiguous positions through the cache."""

    def __init__(self, vocab: int = 64, stop: int = 9):
        self.vocab, self.stop, self.fed = vocab, stop, []

    def new_cache(self, batch_size, max_len):
        zeros = torch.zeros(batch_size, 1, max_len, 1)
        return KVCache([LayerKV(zeros, zeros.clone())])

    def decode_step(self, tokens, start_pos, cache):
        expected = self.fed[-1][0] + self.fed[-1][1] if self.fed else 0
        assert start_pos == expected
        self.fed.append((start_pos, tokens.shape[1]))
        last = tokens[:, -1]
        nxt = torch.where(last == self.stop, torch.full_like(last, 2), (last + 1) % self.vocab)
        logits = torch.full((tokens.shape[0], self.vocab), -1e9)
        logits[torch.arange(tokens.shape[0]), nxt] = 0.0
        return logits


def test_each_sample_stops_at_its_own_eos_and_max_gen_len():
    decoder = CountingDecoder()
    prompts = [[1, 5], [1, 3, 4, 5, 6, 7], [1, 20, 30]]
    out = generate_ids(decoder, prompts, eos_id=2, max_seq_len=64, max_gen_len=6, temperature=0)
    # sample 2 is teacher-forced through "30" although the scripted model predicts 21
    assert out == [[6, 7, 8, 9], [8, 9], [31, 32, 33, 34, 35, 36]]
    assert decoder.fed[0] == (0, 2)  # decoding starts at the shortest prompt
    assert sum(n for _, n in decoder.fed) <= 6 + 6  # stopped once every sample finished


def test_generation_respects_max_seq_len_and_validates():
    decoder = CountingDecoder(stop=1000, vocab=2000)
    out = generate_ids(
        decoder, [[1, 10, 11]], eos_id=2, max_seq_len=8, max_gen_len=50, temperature=0
    )
    assert out == [[12, 13, 14, 15, 16]]  # total length capped at max_seq_len
    with pytest.raises(ValueError, match="empty prompt"):
        generate_ids(decoder, [[]], eos_id=2, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(decoder, [list(range(8))], eos_id=2, max_seq_len=8)
    assert generate_ids(decoder, [[1, 4]], eos_id=2, max_seq_len=8, max_gen_len=0) == [[]]


def test_sample_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_top_p(probs, 0.6, g)
    assert set(picks.tolist()) == {0, 1}
    assert 0.55 < (picks == 0).float().mean() < 0.70  # renormalised 0.5 / 0.8 = 0.625
    assert set(sample_top_p(probs, 1e-9, g).tolist()) == {0}


def test_top_p_sampling_is_seeded_and_tiny_top_p_is_greedy(tokenizer):
    model = make_model(tokenizer)
    feats = torch.randn(len(PROMPTS), ENC)
    kw = dict(max_gen_len=10, temperature=1.5, top_p=0.9)
    a = model.generate_ids_from_feats(feats, PROMPTS, seed=7, **kw)
    assert a == model.generate_ids_from_feats(feats, PROMPTS, seed=7, **kw)
    others = [model.generate_ids_from_feats(feats, PROMPTS, seed=s, **kw) for s in (8, 9)]
    assert any(o != a for o in others)
    greedy = model.generate_ids_from_feats(feats, PROMPTS, max_gen_len=10, temperature=0)
    nucleus_of_one = model.generate_ids_from_feats(
        feats, PROMPTS, max_gen_len=10, temperature=0.7, top_p=1e-9, seed=1
    )
    assert nucleus_of_one == greedy


def test_streaming_yields_the_same_text(tokenizer):
    model = make_model(tokenizer)
    prompts = [format_prompt("Describe the scene."), format_prompt("Count", "2 stars")]
    inputs = {"Image": [torch.randn(2, ENC), 1]}
    pieces = {0: [], 1: []}
    texts = model.generate(
        inputs,
        prompts,
        max_gen_len=15,
        temperature=0,
        stream=lambda i, piece: pieces[i].append(piece),
    )
    assert ["".join(pieces[i]) for i in (0, 1)] == texts
    assert any(len(p) > 1 for p in pieces.values())
    feats = model.encode_inputs(inputs)
    streamed = {0: "", 1: ""}
    for i, piece in model.stream_from_feats(feats, prompts, max_gen_len=15, temperature=0):
        streamed[i] += piece
    assert [streamed[0], streamed[1]] == texts
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    assert model.generate_from_feats(feats, ids, max_gen_len=15, temperature=0) == texts


def test_text_only_generation_and_plain_llama_decoder(tokenizer):
    model = make_model(tokenizer)
    out = model.generate(None, [format_prompt("Say hi")], max_gen_len=6, temperature=0)
    assert out == model.generate_from_feats(
        torch.zeros(1, ENC), [format_prompt("Say hi")], max_gen_len=6, temperature=0
    )
    texts = generate_text(
        model.llama, tokenizer, PROMPTS[:2], max_seq_len=256, max_gen_len=4, temperature=0
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    tokens = list(
        iter_tokens(
            model.llama, PROMPTS[:2], eos_id=2, max_seq_len=256, max_gen_len=4, temperature=0
        )
    )
    assert all(i in (0, 1) for i, _ in tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_batched_equals_one_by_one(tokenizer):
    model = make_model(tokenizer).to("cuda")
    feats = torch.randn(len(PROMPTS), ENC, device="cuda")
    batched = model.generate_ids_from_feats(feats, PROMPTS, max_gen_len=8, temperature=0)
    single = [
        model.generate_ids_from_feats(feats[i : i + 1], [p], max_gen_len=8, temperature=0)[0]
        for i, p in enumerate(PROMPTS)
    ]
    assert batched == single
    sampled = model.generate_ids_from_feats(feats, PROMPTS, max_gen_len=8, temperature=1.0, seed=3)
    assert sampled == model.generate_ids_from_feats(
        feats, PROMPTS, max_gen_len=8, temperature=1.0, seed=3
    )
