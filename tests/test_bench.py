"""Benchmarks: the baseline computes the model's function, the fast decoder the model's tokens,
and the bench command runs end to end on a micro configuration. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baseline import BaselineImageBindLLM, reference_cache
from ibllm_lab import bench
from ibllm_lab.cache import FaissCache
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.fast import FastGenerator
from ibllm_lab.generation import generate_ids
from ibllm_lab.model import ImageBindLLM

LLAMA = LlamaConfig(
    dim=32, n_layers=3, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64, max_batch_size=3
)
ADAPTER = AdapterConfig(encoder_dim=16, query_layer=2, lora_rank=4)


def make_model(adapter: AdapterConfig = ADAPTER, seed: int = 0) -> ImageBindLLM:
    """Random weights, with the zero-initialised parts (gates, biases, LoRA up) non-zero too,
    so that every path of the method contributes to the output."""
    torch.manual_seed(seed)
    model = ImageBindLLM(LLAMA, adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "bias")) or "_l2." in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, LLAMA.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_baseline_computes_the_models_logits_and_loss():
    model = make_model()
    baseline = BaselineImageBindLLM(LLAMA, ADAPTER)
    baseline.load_state_dict(model.state_dict(), strict=True)  # same keys, nothing missing
    tokens = torch.randint(3, LLAMA.vocab_size, (2, 11))
    feats = torch.randn(2, ADAPTER.encoder_dim)
    with torch.no_grad():
        torch.testing.assert_close(baseline.logits(tokens, feats), model.logits(tokens, feats))
        torch.testing.assert_close(baseline.logits(tokens, None), model.logits(tokens, None))
        labels = tokens.clone()
        labels[:, :4] = 0
        torch.testing.assert_close(baseline(tokens, labels, feats), model(tokens, labels, feats))


def test_baseline_shares_weights_and_generates_the_models_tokens():
    model = make_model()
    baseline = BaselineImageBindLLM.from_model(model)
    assert baseline.llama.output.weight.data_ptr() == model.llama.output.weight.data_ptr()
    batch = torch.tensor(prompts([6, 6]))
    feats = torch.randn(2, ADAPTER.encoder_dim)
    theirs = baseline.generate(feats, batch, 12)
    for fast in (False, True):
        ours = model.generate_ids_from_feats(
            feats, batch.tolist(), 12, temperature=0, eos_id=-1, fast=fast
        )
        assert theirs[:, 6:].tolist() == ours, fast


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_p": 0.9, "seed": 3},
        {"temperature": 0.0, "max_gen_len": 0},
    ],
)
def test_fast_generator_gives_the_models_tokens(options):
    """Unequal prompts (teacher forcing), more prompts than max_batch_size (chunks); packed
    and unpacked weights; static: the graph-capturable step (masked attention over the whole
    cache) run eagerly."""
    model = make_model()
    batch = prompts([5, 9, 1, 7])
    feats = torch.randn(4, ADAPTER.encoder_dim)
    options = {"max_gen_len": 20, "eos_id": -1, **options}
    expected = model.generate_ids_from_feats(feats, batch, **options, fast=False)
    for pack, static in [(True, False), (False, False), (False, True)]:
        engine = FastGenerator(model, pack=pack, static=static)
        assert engine.generate_ids(feats, batch, **options) == expected, (pack, static)
    # the model's default path is this engine
    assert model.generate_ids_from_feats(feats, batch, **options) == expected


def test_fast_generator_stops_at_eos_like_the_model():
    model = make_model()
    batch, feats = prompts([4, 6, 5]), torch.randn(3, ADAPTER.encoder_dim)
    free = model.generate_ids_from_feats(feats, batch, 20, temperature=0, eos_id=-1, fast=False)
    eos = free[1][7]  # a token the second sample produces mid-way
    expected = model.generate_ids_from_feats(
        feats, batch, 20, temperature=0, eos_id=eos, fast=False
    )
    assert len(expected[1]) < 20
    engine = FastGenerator(model)
    assert engine.generate_ids(feats, batch, 20, temperature=0, eos_id=eos) == expected
    # the engine is reused across calls (static buffers): a second call gives the same
    assert engine.generate_ids(feats, batch, 20, temperature=0, eos_id=eos) == expected


@pytest.mark.parametrize("injection", ["prefix_attention", "ungated"])
def test_fast_generator_other_injections(injection):
    adapter = ADAPTER.replace(
        injection=injection, query_len=2 if injection == "prefix_attention" else 1
    )
    model = make_model(adapter)
    batch, feats = prompts([3, 8]), torch.randn(2, adapter.encoder_dim)
    expected = model.generate_ids_from_feats(feats, batch, 10, temperature=0, eos_id=-1, fast=False)
    assert FastGenerator(model).generate_ids(feats, batch, 10, temperature=0, eos_id=-1) == expected
    with pytest.raises(ValueError, match="cuda_graph"):
        FastGenerator(model, cuda_graph=True)
    with pytest.raises(ValueError, match="static"):
        FastGenerator(model, compile=True, static=False)


def test_fast_generator_logits_match_the_model():
    """The packed step (merged LoRA, fused projections, static cache) computes the model's
    logits, not only its argmax."""
    model = make_model()
    tokens = torch.tensor(prompts([9, 9]))
    feats = torch.randn(2, ADAPTER.encoder_dim)
    engine = FastGenerator(model, pack=True)
    decoder = engine.decoder(model.bind(feats))
    cache = decoder.new_cache(2, 16)
    first = decoder.decode_step(tokens[:, :5], 0, cache)
    steps = [decoder.decode_step(tokens[:, i : i + 1], i, cache) for i in range(5, 9)]
    with torch.no_grad():
        full = model.logits(tokens, feats)  # (B, T, V)
    torch.testing.assert_close(first, full[:, 4], atol=1e-4, rtol=1e-4)
    for i, logits in zip(range(5, 9), steps, strict=True):
        torch.testing.assert_close(logits, full[:, i], atol=1e-4, rtol=1e-4)


def test_host_syncs_every_few_steps_give_the_same_tokens():
    """The one decoding loop: reading tokens back every 8 steps (as generate_ids does) gives
    the tokens of reading them every step, on the fast and the plain decoder alike."""
    model = make_model()
    batch, feats = prompts([2, 6, 4]), torch.randn(3, ADAPTER.encoder_dim)
    v = model.bind(feats)
    for decoder in (FastGenerator(model).decoder(v), model.decoder(v, fast=False)):
        for options in (
            {"temperature": 0.0, "eos_id": -1},
            {"temperature": 1.0, "seed": 5, "eos_id": 7},
        ):
            common = {"max_seq_len": LLAMA.max_seq_len, "max_gen_len": 15, **options}
            every_step = generate_ids(decoder, batch, sync_every=1, **common)
            assert generate_ids(decoder, batch, sync_every=8, **common) == every_step
            assert generate_ids(decoder, batch, sync_every=100, **common) == every_step


def test_reference_cache_equals_faiss_cache():
    bank = F.normalize(torch.randn(500, 24), dim=-1)
    query = F.normalize(torch.randn(6, 24), dim=-1)
    cache = FaissCache.build(bank)
    expected = cache(query, 10, 20.0, 0.5)
    torch.testing.assert_close(reference_cache(cache.index, query, 10, 20.0, 0.5), expected)


MICRO = [
    "--threads",
    "1",
    "--train-shapes",
    "pretrain:2x12,finetune:2x16",
    "--gen-batches",
    "1,2",
    "--prompt-len",
    "6",
    "--new-tokens",
    "3",
    "--iters",
    "1",
    "--warmup",
    "0",
    "--gen-iters",
    "1",
    "--cache-sizes",
    "2000",
    "--cache-dim",
    "16",
    "--nlist",
    "8",
    "--n-queries",
    "4",
]


def test_bench_cli_micro_run_and_merge(tmp_path):
    assert bench.cli(["--suite", "cpu", "--out", str(tmp_path), "--name", "micro", *MICRO]) == 0
    payload = json.loads((tmp_path / "micro.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    rows = payload["results"]
    groups = {(r["group"], r["impl"]) for r in rows}
    assert ("train", "baseline") in groups and ("train", "ibllm_lab") in groups
    assert ("generate", "ibllm_lab FastGenerator (packed)") in groups
    assert {r["impl"] for r in rows if r["group"] == "cache"} >= {"baseline", "faiss flat"}
    assert all(r["value"] > 0 for r in rows if r["group"] != "e2e")
    fast = [r for r in rows if r["impl"].startswith("ibllm_lab FastGenerator")]
    assert all(r["extra"]["same_tokens"] == 1.0 for r in fast)
    cache_rows = [r for r in rows if r["group"] == "cache" and r["impl"].startswith("faiss flat")]
    assert cache_rows[0]["extra"]["recall@10"] == 1.0
    markdown = (tmp_path / "micro.md").read_text()
    assert "| train | pretrain 2x12 | ibllm_lab |" in markdown and "torch: " in markdown
    bench.cli(
        [
            "--merge",
            str(tmp_path / "micro.json"),
            str(tmp_path / "micro.json"),
            "--out",
            str(tmp_path),
            "--name",
            "merged",
        ]
    )
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert len(merged["results"]) == 2 * len(rows)


def test_e2e_row_reads_the_newest_full_run(tmp_path):
    from benchmarks.bench_e2e import main_job_row

    assert main_job_row(tmp_path / "reports").extra["status"] == "not run"
    for name, started, seconds, profile in [
        ("a", "2026-01-01T00:00:00", 100.0, "full"),
        ("b", "2026-02-01T00:00:00", 200.0, "full"),
        ("c", "2026-03-01T00:00:00", 5.0, "quick"),
    ]:
        run = tmp_path / "reports" / name
        run.mkdir(parents=True)
        (run / "run.json").write_text(
            json.dumps(
                {"profile": profile, "started": started, "seconds": seconds, "notebooks": []}
            )
        )
    row = main_job_row(tmp_path / "reports")
    assert row.value == 200.0 and row.extra["run"] == "reports/b/run.json"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("compile_step", [False, True])
def test_cuda_graph_decoding_gives_the_models_tokens(compile_step):
    model = make_model().to("cuda")
    batch = prompts([5, 9, 1, 7])
    feats = torch.randn(4, ADAPTER.encoder_dim, device="cuda")
    options = {"max_gen_len": 20, "eos_id": -1, "temperature": 0.0}
    expected = model.generate_ids_from_feats(feats, batch, **options)
    engine = FastGenerator(model, compile=compile_step)
    assert engine.cuda_graph and not engine.pack
    assert engine.generate_ids(feats, batch, **options) == expected
    assert engine.generate_ids(feats, batch, **options) == expected  # graphs replayed


@pytest.mark.gpu
@cuda
def test_torch_cache_on_gpu_equals_cpu():
    from ibllm_lab.cache import TorchCache

    bank = F.normalize(torch.randn(3000, 32), dim=-1)
    query = F.normalize(torch.randn(8, 32), dim=-1)
    expected = FaissCache.build(bank)(query, 10, 20.0, 0.5)
    for dtype in (torch.float32, torch.float16):
        out = TorchCache(bank, dtype=dtype)(query.cuda(), 10, 20.0, 0.5)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_step_profiles_group_kernels_and_write_tables(tmp_path):
    """benchmarks/profile_steps.py on CPU: one decode and one training step, operators grouped
    by kind (shares sum to one), FLOP-derived rates, JSON and markdown written."""
    from benchmarks import profile_steps

    assert profile_steps.kind_of("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_bias_TNT") == "matmul"
    assert profile_steps.kind_of("pytorch_flash::flash_fwd_kernel") == "attention"
    assert profile_steps.kind_of("multi_tensor_apply_kernel<AdamW>") == "optimiser"
    assert profile_steps.kind_of("vectorized_elementwise_kernel<silu>") == "elementwise"
    out = profile_steps.main(
        [
            "--what",
            "decode,train,cache",
            "--steps",
            "1",
            "--cache-n",
            "2000",
            "--out",
            str(tmp_path),
        ]
    )
    whats = [r["what"] for r in out["rows"]]
    assert (
        whats[0].startswith("cache 2,000 x 1024")
        and "decode step, batch 16 (eager static)" in whats
    )
    assert "train finetune 4x512" in whats
    for row in out["rows"]:
        assert row["busy_ms"] > 0 and abs(sum(row["share"].values()) - 1) < 0.01
    train = next(r for r in out["rows"] if r["what"] == "train pretrain 4x96")
    assert train["share"]["matmul"] > 0.2 and train["model_tflops"] > 0
    assert json.loads((tmp_path / "profile.json").read_text())["meta"]["config"] == "tiny/tiny"
    assert "| train pretrain 32x96 |" in (tmp_path / "profile.md").read_text()
