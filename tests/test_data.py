"""Data formats, tokenisation, feature datasets and deterministic sharding (ibllm_lab.data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ibllm_lab.data import (
    CAPTION_INSTRUCTION,
    Example,
    FeatureDataset,
    ShardedOrder,
    collate,
    encode_example,
    read_alpaca_json,
    read_llava_json,
    read_pretrain_csv,
)

FIXTURES = Path(__file__).parent / "fixtures" / "train"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ibllm_lab.tokenizer import Tokenizer, train_tokenizer

    text = [
        "a red cube on the left.",
        "two small blue spheres moving up.",
        "What color is the object? red green blue yes no left right",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.",
        "### Instruction: ### Input: ### Response:",
    ] * 20
    path = train_tokenizer(text, tmp_path_factory.mktemp("tok") / "tok", vocab_size=400)
    return Tokenizer(path)


def test_pretrain_csv_rows_become_caption_examples():
    examples = read_pretrain_csv(FIXTURES / "pretrain.csv")
    assert [e.media for e in examples] == ["images/s0001.png", "images/s0002.png"]
    assert examples[1].output == "two small blue spheres moving up."
    assert {e.instruction for e in examples} == {CAPTION_INSTRUCTION}
    assert "Generate caption of this image" in examples[0].prompt()


def test_pretrain_csv_missing_column_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("url\ttext\nx.png\thello\n")
    with pytest.raises(ValueError, match="caption"):
        read_pretrain_csv(bad)


def test_llava_keeps_first_turn_without_image_placeholder():
    examples = read_llava_json(FIXTURES / "llava.json")
    assert [(e.instruction, e.output) for e in examples] == [
        ("What color is the object?", "red"),
        ("Is the shape a sphere?", "yes"),
    ]
    assert examples[0].media == "images/s0001.png" and examples[0].id == "s0001_q0"
    assert "<image>" not in examples[1].prompt()


def test_alpaca_prompts_with_and_without_input_and_no_tuple_bug():
    plain, with_input = read_alpaca_json(FIXTURES / "alpaca.json")
    assert plain.input is None and plain.media is None
    assert with_input.input == "two blue spheres"
    assert "### Input:" not in plain.prompt()
    assert "### Input:\ntwo blue spheres" in with_input.prompt()
    # the reference's trailing comma made the instruction a tuple: "('Name a primary color.',)"
    assert "### Instruction:\nName a primary color.\n" in plain.prompt()
    assert "('" not in plain.prompt()
    with pytest.raises(TypeError):
        Example(("Name a primary color.",), "red")  # type: ignore[arg-type]


def test_encode_example_masks_prompt_and_padding(tokenizer):
    prompt = Example("What color is the object?", "red").prompt()
    tokens, labels = encode_example(tokenizer, prompt, "red", max_len=96)
    full = tokenizer.encode(prompt + "red", bos=True, eos=True)
    n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
    assert tokens.shape == labels.shape == (96,)
    assert tokens[: len(full)].tolist() == full
    assert (tokens[len(full) :] == 0).all()
    assert (labels[:n_prompt] == 0).all() and (labels[len(full) :] == 0).all()
    assert labels[n_prompt : len(full)].tolist() == full[n_prompt:]
    assert labels[len(full) - 1] == tokenizer.eos_id
    short, short_labels = encode_example(tokenizer, prompt, "red", max_len=8)
    assert short.tolist() == full[:8] and (short_labels == 0).all()


def test_feature_dataset_looks_up_features_and_zeros_text_only(tokenizer):
    examples = read_llava_json(FIXTURES / "llava.json") + read_alpaca_json(FIXTURES / "alpaca.json")
    feats = {"images/s0001.png": torch.ones(4), "images/s0002.png": torch.full((4,), 2.0)}
    ds = FeatureDataset(examples, tokenizer, max_len=128, features=feats, feature_dim=4)
    assert len(ds) == 4
    assert ds[0][2].tolist() == [1.0] * 4 and ds[1][2].tolist() == [2.0] * 4
    assert (ds[2][2] == 0).all() and (ds[3][2] == 0).all()
    full = [tokenizer.encode(ex.prompt() + ex.output, bos=True, eos=True) for ex in examples]
    assert ds.lengths == tuple(len(ids) for ids in full)  # what length grouping sorts by
    tokens, labels, f = collate([ds[i] for i in range(4)])
    assert f.shape == (4, 4)
    assert tokens.shape[1] < 128 and (tokens[:, -1] != 0).any()  # trailing padding dropped
    with pytest.raises(KeyError, match="s0002"):
        FeatureDataset(examples, tokenizer, 128, {"images/s0001.png": torch.ones(4)}, 4)


def test_sharded_order_partitions_each_epoch_deterministically():
    single = ShardedOrder(10, seed=3)
    ranks = [ShardedOrder(10, world_size=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        parts = [o.indices(epoch) for o in ranks]
        assert len(parts[0]) == len(parts[1]) == 5
        assert sorted(parts[0] + parts[1]) == list(range(10))
        # rank r holds positions r, r + 2, ... of the single-process order
        assert parts[0] == single.indices(epoch)[0::2]
    assert single.indices(0) != single.indices(1)
    assert ShardedOrder(10, seed=3).indices(1) == single.indices(1)
    assert list(single.batches(0, 4, start=1)) == [single.indices(0)[4:8]]
    assert ShardedOrder(7, world_size=2, rank=1).per_rank == 4


def test_length_grouped_batches_hold_the_same_examples_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(4, 100, (200,), generator=gen).tolist())
    plain = ShardedOrder(200, seed=3)
    grouped = ShardedOrder(200, seed=3, group=4, lengths=lengths)

    def padded(batches):  # tokens computed when each batch is padded to its longest example
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    for epoch in (0, 1):
        a, b = list(plain.batches(epoch, 8)), list(grouped.batches(epoch, 8))
        assert len(a) == len(b) == 25 and all(len(x) == 8 for x in b)
        # each run of 4 batches is re-cut from the same 32 examples (the last run is 1 batch)
        for s in range(0, 25, 4):
            assert sorted(sum(a[s : s + 4], [])) == sorted(sum(b[s : s + 4], []))
        assert padded(b) < 0.75 * padded(a)
        # within a run each batch holds a contiguous slice of lengths, the batches shuffled
        assert all(
            max(lengths[i] for i in x) <= min(lengths[i] for i in y)
            or max(lengths[i] for i in y) <= min(lengths[i] for i in x)
            for s in range(0, 24, 4)
            for x in b[s : s + 4]
            for y in b[s : s + 4]
            if x != y
        )
        # a pure function of (seed, epoch): resuming at batch 7 gives the rest of the stream
        assert list(grouped.batches(epoch, 8, start=7)) == b[7:]
        assert list(ShardedOrder(200, seed=3, group=4, lengths=lengths).batches(epoch, 8)) == b
    firsts = [list(grouped.batches(e, 8))[:4] for e in range(6)]
    orders = {tuple(max(lengths[i] for i in x) for x in run) for run in firsts}
    assert len(orders) > 1  # not always shortest first
    with pytest.raises(ValueError, match="lengths for 200 examples, got None"):
        ShardedOrder(200, group=4)
    with pytest.raises(ValueError, match="lengths for 200 examples, got 10"):
        ShardedOrder(200, group=4, lengths=lengths[:10])
    with pytest.raises(ValueError, match="group must be >= 0"):
        ShardedOrder(200, group=-1, lengths=lengths)
