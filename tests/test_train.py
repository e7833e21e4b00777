"""The trainer (ibllm_lab.train): optimiser semantics, phase filters, checkpoints and resume,
metrics, and the base LM on a small generated world."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset

from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.model import ImageBindLLM
from ibllm_lab.peft import mark_trainable, trainable_keys
from ibllm_lab.train import (
    CHECKPOINT,
    METRICS,
    PRESETS,
    TrainConfig,
    WarmupCosine,
    param_groups,
    scaled_lr,
    train_phase,
    train_pipeline,
)

VOCAB, FEAT = 48, 16


def tiny_model(seed: int = 0) -> ImageBindLLM:
    torch.manual_seed(seed)
    llama = LlamaConfig(
        dim=32, n_layers=2, n_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=32
    )
    # the method's three bind blocks (the "tiny" preset's bind network is linear), so every
    # kind of trainable parameter is in the tests
    adapter = AdapterConfig.from_name(
        "tiny", encoder_dim=FEAT, query_layer=2, lora_rank=4, bind_blocks=3
    )
    model = ImageBindLLM(llama, adapter)
    model.llama.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


class Synthetic(Dataset):
    """``n`` random sequences of length 12: 4 prompt positions (label 0), then 8 answer
    tokens that depend on the sample's feature, so the adapter has something to learn."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.feats = torch.nn.functional.normalize(torch.randn(n, FEAT, generator=g), dim=-1)
        answer = 3 + (self.feats[:, :8] > 0).long() * 7 + torch.arange(8)  # (n, 8)
        prompt = torch.randint(3, VOCAB, (n, 4), generator=g)
        prompt[:, 0] = 1
        self.tokens = torch.cat([prompt, answer], dim=1)
        self.labels = self.tokens.clone()
        self.labels[:, :4] = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i], self.labels[i], self.feats[i]


class Ragged(Synthetic):
    """``Synthetic`` with answers cut to 1-8 tokens (the rest padding) and their lengths."""

    def __init__(self, n: int = 24, seed: int = 0):
        super().__init__(n, seed)
        keep = 5 + torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(seed + 1))
        pad = torch.arange(self.tokens.shape[1]) >= keep[:, None]
        self.tokens[pad] = 0
        self.labels[pad] = 0

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple((self.tokens != 0).sum(dim=1).tolist())


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        phase="pretrain",
        epochs=2,
        batch_size=4,
        accum_iter=2,
        base_lr=0.5,
        warmup_epochs=1,
        log_every=1,
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_then_half_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = WarmupCosine(opt, lr=1.0, min_lr=0.1, warmup=4, total=12)
    assert [sched.lr_at(s) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert sched.lr_at(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched.lr_at(12) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == 0.0
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.25
    cfg = TrainConfig(batch_size=8, accum_iter=4, base_lr=1e-3)
    assert scaled_lr(cfg, world_size=2) == pytest.approx(1e-3 * 64 / 256)


def test_weight_decay_groups_exclude_biases_and_1d_params():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    for phase, wd in (("pretrain", 0.05), ("finetune", 0.02)):
        mark_trainable(model, phase)
        no_decay, decay = param_groups(model, wd)
        assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == wd
        got_no = {names[id(p)] for p in no_decay["params"]}
        got_yes = {names[id(p)] for p in decay["params"]}
        assert got_no | got_yes == trainable_keys(model, phase)
        expect_no = {
            n
            for n in got_no | got_yes
            if n.endswith(".bias") or dict(model.named_parameters())[n].ndim <= 1
        }
        assert got_no == expect_no
    mark_trainable(model, "pretrain")
    no_decay, decay = (
        set(map(lambda p: names[id(p)], g["params"])) for g in param_groups(model, 0.05)
    )
    assert {"image_bind_proj.bias", "image_bind_norm_1.weight"} <= no_decay
    assert {"image_bind_proj.weight", "prefix_query.weight"} <= decay
    assert "llama.layers.0.attention.gate" in decay  # (1, n_heads, 1, 1): not 1-d
    mark_trainable(model, "finetune")
    no_decay, decay = (
        set(map(lambda p: names[id(p)], g["params"])) for g in param_groups(model, 0.02)
    )
    assert all("lora" in n for n in decay)
    assert "llama.layers.1.attention.wq.bias" in no_decay and "llama.norm.weight" in no_decay


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_training_changes_exactly_the_phase_parameters(tmp_path, phase):
    model = tiny_model()
    mark_trainable(model, phase)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_phase(
        model, Synthetic(), small_cfg(phase=phase, epochs=1, accum_iter=1), tmp_path, progress=False
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable_keys(model, phase)


def test_resume_from_mid_run_checkpoint_equals_uninterrupted_run(tmp_path):
    data = Synthetic()
    full = tiny_model()
    mark_trainable(full, "pretrain")
    result = train_phase(full, data, small_cfg(), tmp_path / "a", progress=False)
    assert result.steps == 6  # 24 examples / (4 x 2) = 3 steps per epoch, 2 epochs
    first = tiny_model()
    mark_trainable(first, "pretrain")
    stopped = train_phase(first, data, small_cfg(stop_after=4), tmp_path / "b", progress=False)
    assert stopped.steps == 4  # interrupted in the middle of the second epoch
    resumed_model = tiny_model()
    mark_trainable(resumed_model, "pretrain")
    resumed = train_phase(resumed_model, data, small_cfg(), tmp_path / "b", progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    for (name, p), q in zip(full.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    a = pd.read_csv(tmp_path / "a" / METRICS)
    b = pd.read_csv(tmp_path / "b" / METRICS)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="batch_size"):
        train_phase(tiny_model(), data, small_cfg(batch_size=2), tmp_path / "b", progress=False)


def test_length_grouped_training_resumes_like_an_uninterrupted_run(tmp_path):
    data = Ragged()
    cfg = small_cfg(group_by_length=2, accum_iter=1)
    full = tiny_model()
    mark_trainable(full, "pretrain")
    assert train_phase(full, data, cfg, tmp_path / "a", progress=False).steps == 12
    first = tiny_model()
    mark_trainable(first, "pretrain")
    stop = small_cfg(group_by_length=2, accum_iter=1, stop_after=7)
    train_phase(first, data, stop, tmp_path / "b", progress=False)
    resumed = tiny_model()
    mark_trainable(resumed, "pretrain")
    assert train_phase(resumed, data, cfg, tmp_path / "b", progress=False).resumed_from == 7
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # grouping changes the batches, so the same run without it trains other weights
    plain = tiny_model()
    mark_trainable(plain, "pretrain")
    train_phase(plain, data, small_cfg(accum_iter=1), tmp_path / "c", progress=False)
    assert not torch.equal(plain.prefix_query.weight, full.prefix_query.weight)
    # a grouped run does not resume without grouping
    with pytest.raises(ValueError, match="group_by_length"):
        train_phase(tiny_model(), data, small_cfg(accum_iter=1), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="group_by_length needs a dataset with .lengths"):
        train_phase(tiny_model(), Synthetic(), cfg, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="group_by_length must be >= 0"):
        small_cfg(group_by_length=-1)


def test_checkpoint_and_metrics_contents(tmp_path):
    from ibllm_lab.io import safe_torch_load

    model = tiny_model()
    mark_trainable(model, "pretrain")
    train_phase(model, Synthetic(), small_cfg(), tmp_path, progress=False, extra={"note": "x"})
    state = safe_torch_load(tmp_path / CHECKPOINT)
    assert set(state["trainable"]) == trainable_keys(model, "pretrain")
    assert state["position"] == {
        "step": 6,
        "epoch": 2,
        "step_in_epoch": 0,
        "seed": 0,
        "steps_per_epoch": 3,
    }
    assert {"optimizer", "scheduler", "scaler", "rng", "train_config"} <= set(state)
    assert state["scheduler"]["step_count"] == 6 and state["extra"] == {"note": "x"}
    metrics = pd.read_csv(tmp_path / METRICS)
    gates = [f"gate_L{layer}_H{h}" for layer in range(2) for h in range(2)]
    assert list(metrics.columns) == ["step", "epoch", "loss", "lr", *gates]
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0]
    assert metrics["lr"].iloc[0] == 0.0  # warm-up starts at zero: the first step moves nothing
    assert (metrics[gates].iloc[0] == 0).all()
    assert ((metrics[gates].iloc[-1].abs() > 0) & (metrics[gates].iloc[-1].abs() < 1)).all()


def test_compiled_blocks_train_like_eager_ones(tmp_path):
    """TrainConfig.compile_blocks: the same losses and parameters as the eager run (CPU
    inductor), and a resume may switch it on or off."""
    runs = {}
    for mode in (None, "default"):
        model = tiny_model()
        mark_trainable(model, "pretrain")
        cfg = small_cfg(epochs=1, compile_blocks=mode)
        train_phase(model, Synthetic(), cfg, tmp_path / str(mode), progress=False)
        compiled = [b._compiled_call_impl is not None for b in model.llama.layers]
        assert compiled == [mode is not None] * len(compiled)
        runs[mode] = (pd.read_csv(tmp_path / str(mode) / METRICS), model)
    (eager, eager_model), (comp, comp_model) = runs[None], runs["default"]
    assert len(comp) == len(eager) == 3
    assert (comp["loss"] - eager["loss"]).abs().max() < 1e-4
    for (name, p), q in zip(eager_model.named_parameters(), comp_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    resumed = tiny_model()  # the eager run's checkpoint resumes with compilation switched on
    mark_trainable(resumed, "pretrain")
    cfg = small_cfg(epochs=1, compile_blocks="default")
    result = train_phase(resumed, Synthetic(), cfg, tmp_path / "None", progress=False)
    assert result.resumed_from == result.steps == 3
    with pytest.raises(ValueError, match="compile_blocks"):
        TrainConfig(compile_blocks="fastest")


def test_config_validation_and_presets(tmp_path):
    with pytest.raises(ValueError, match="phase"):
        TrainConfig(phase="posttrain")
    # per-phase settings are checked before anything trains (base-lm takes overrides only)
    with pytest.raises(ValueError, match=r"unknown phases \['bogus'\]"):
        train_pipeline(None, None, tmp_path, phase_overrides={"base-lm": {}, "bogus": {}})
    with pytest.raises(ValueError, match=r"unknown phases \['base-lm'\]"):
        train_pipeline(None, None, tmp_path, max_examples={"base-lm": 3})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    for name, phases in PRESETS.items():
        for phase in phases:
            cfg = TrainConfig.from_name(name, phase)
            assert cfg.phase == phase
    assert TrainConfig.from_name("default", "pretrain").max_words == 96
    assert TrainConfig.from_name("default", "finetune").max_words == 512
    assert TrainConfig.from_name("reference", "pretrain").weight_decay == 0.05
    assert TrainConfig.from_name("reference", "finetune").weight_decay == 0.02


def test_cli_base_lm_writes_meta_format(tmp_path):
    from ibllm_lab.checkpoint import load_llama
    from ibllm_lab.llama import meta_keys
    from ibllm_lab.tokenizer import Tokenizer
    from ibllm_lab.train import cli
    from ibllm_lab.world import WorldConfig, generate_world

    world = generate_world(
        WorldConfig.from_name("quick", n_scenes=24, n_alpaca=24), tmp_path / "world"
    )
    out = tmp_path / "llama"
    argv = [
        "base-lm",
        "--world",
        str(world.root),
        "--out",
        str(out),
        "--preset",
        "quick",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    assert cli(argv) == 0
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= {
        p.name for p in out.iterdir()
    }
    state, cfg = load_llama(out)
    assert list(state) == meta_keys(cfg)
    assert Tokenizer(out / "tokenizer.model").n_words == cfg.vocab_size
    metrics = pd.read_csv(out / "run" / METRICS)
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0]


# ------------------------------------------------------------- adapter variants (ablations)
@pytest.fixture(scope="module")
def small_world_and_lm(tmp_path_factory):
    """A 24-scene world, a base LM trained for two steps, and random unit image features."""
    from ibllm_lab.data import media_key
    from ibllm_lab.modality import Modality
    from ibllm_lab.train import train_base_lm
    from ibllm_lab.world import WorldConfig, generate_world

    root = tmp_path_factory.mktemp("variants")
    world = generate_world(WorldConfig.from_name("quick", n_scenes=24, n_alpaca=24), root / "world")
    cfg = TrainConfig.from_name("quick", "base-lm", batch_size=8, stop_after=2, threads=1)
    llama = train_base_lm(world, cfg, root / "llama", arch="quick", progress=False)
    g = torch.Generator().manual_seed(0)
    feats = {
        media_key(s.files[Modality.IMAGE]): torch.nn.functional.normalize(
            torch.randn(FEAT, generator=g), dim=0
        )
        for s in world.scenes
    }
    return world, llama, feats


def _phase_cfg(phase: str, batch_size: int = 2) -> TrainConfig:
    return TrainConfig.from_name("quick", phase, epochs=1, batch_size=batch_size, threads=1)


def test_adapter_overrides_are_trained_and_recorded(small_world_and_lm, tmp_path):
    from ibllm_lab.checkpoint import load, read_adapter_file
    from ibllm_lab.io import safe_torch_load
    from ibllm_lab.train import train_adapter

    world, llama, feats = small_world_and_lm
    overrides = {"injection": "prefix_attention", "query_len": 2, "lora_rank": 0}
    pre = train_adapter(
        world, _phase_cfg("pretrain"), llama, tmp_path / "pre", feats,
        adapter_overrides=overrides, max_examples=8, progress=False,
    )  # fmt: skip
    state, meta = read_adapter_file(pre)
    acfg = meta["adapter_config"]
    assert {k: acfg[k] for k in overrides} == overrides and acfg["w_bias"] is True
    assert meta["adapter_overrides"] == overrides and meta["max_examples"] == 8
    n_layers = meta["llama_config"]["n_layers"]
    assert acfg["query_layer"] == n_layers  # the preset's depth, limited to the LLaMA's
    assert state["prefix_query.weight"].shape[0] == n_layers * 2
    assert not any("lora" in k for k in state) and "llama.layers.0.attention.wq.bias" in state
    model = load(llama, pre, llama_type="")
    assert model.adapter_cfg.injection == "prefix_attention"
    ckpt = safe_torch_load(tmp_path / "pre" / CHECKPOINT)
    assert set(ckpt["trainable"]) == trainable_keys(model, "pretrain")
    assert f"llama.layers.{n_layers - 1}.attention.gate" in ckpt["trainable"]  # gated mode
    assert ckpt["position"]["steps_per_epoch"] == 4  # 8 of the 11 captions, batch 2

    fine = train_adapter(
        world, _phase_cfg("finetune", 8), llama, tmp_path / "fine", feats, init=pre,
        adapter_overrides=overrides, max_examples=16, progress=False,
    )  # fmt: skip
    ckpt = safe_torch_load(tmp_path / "fine" / CHECKPOINT)
    assert ckpt["position"]["steps_per_epoch"] == 2  # 16 of the 46 instructions, batch 8
    per_layer = ["attention_norm.weight", "ffn_norm.weight", "attention.wq.bias"]
    per_layer += ["attention.wo.bias", *(f"feed_forward.w{j}.bias" for j in (1, 2, 3))]
    expected = {"llama.norm.weight"} | {
        f"llama.layers.{i}.{key}" for i in range(n_layers) for key in per_layer
    }
    assert set(ckpt["trainable"]) == expected  # norms and biases: no LoRA
    assert read_adapter_file(fine)[1]["adapter_config"] == acfg
    # the tiny preset standardises features with pre-training's statistics, which the
    # pre-training file records and fine-tuning carries unchanged
    assert acfg["feature_norm"] is True
    used = torch.stack([f for f in feats.values()])
    std = state["feature_std"]
    assert std.min() > 0 and not torch.allclose(std, torch.ones_like(std))
    assert (state["feature_mean"].abs() <= used.abs().max(0).values + 1e-6).all()
    fine_state = read_adapter_file(fine)[0]
    for key in ("feature_mean", "feature_std"):
        torch.testing.assert_close(fine_state[key], state[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="another adapter"):
        train_adapter(
            world, _phase_cfg("finetune"), llama, tmp_path / "clash", feats, init=pre,
            adapter_overrides={"lora_rank": 4}, progress=False,
        )  # fmt: skip


def test_finished_phase_rerun_with_other_threads_keeps_the_next_phase(
    small_world_and_lm, tmp_path, caplog
):
    """Running a finished pre-training again (here with another thread count, which is not
    part of the run's identity) rewrites its adapter file with new metadata but the same
    weights; fine-tuning from it still resumes its own finished run instead of restarting."""
    import logging

    from ibllm_lab.checkpoint import read_adapter_file
    from ibllm_lab.train import train_adapter

    world, llama, feats = small_world_and_lm

    def run(phase, out, threads, init=None):
        cfg = TrainConfig.from_name("quick", phase, epochs=1, batch_size=8, threads=threads)
        return train_adapter(
            world, cfg, llama, tmp_path / out, feats, init=init, max_examples=16, progress=False
        )

    pre = run("pretrain", "pre", 1)
    fine = run("finetune", "fine", 1, pre)
    before = read_adapter_file(fine)[0]
    meta_before = read_adapter_file(pre)[1]["train_config"]["threads"]
    with caplog.at_level(logging.INFO, logger="ibllm_lab.train"):
        run("pretrain", "pre", 2)
        assert read_adapter_file(pre)[1]["train_config"]["threads"] == 2 != meta_before
        run("finetune", "fine", 2, pre)
    assert "starting afresh" not in caplog.text
    after = read_adapter_file(fine)[0]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_made_before_the_adapter_preset_changed_restarts_instead_of_resuming(
    small_world_and_lm, tmp_path, caplog, monkeypatch
):
    """A finished phase written with another adapter configuration (here: the "tiny" preset
    as it was before its bind network became linear) is not resumed, since its parameters
    would not fit: the run starts afresh and trains the preset's current keys."""
    from ibllm_lab.io import safe_torch_load
    from ibllm_lab.train import train_adapter

    world, llama, feats = small_world_and_lm
    out = tmp_path / "pre"
    kw = dict(max_examples=8, progress=False)
    from_name = AdapterConfig.from_name.__func__
    with monkeypatch.context() as m:  # the preset as it was
        m.setattr(
            AdapterConfig,
            "from_name",
            classmethod(lambda cls, name, **o: from_name(cls, name, **{**o, "bind_blocks": 3})),
        )
        train_adapter(world, _phase_cfg("pretrain"), llama, out, feats, **kw)
    old_keys = set(safe_torch_load(out / CHECKPOINT)["trainable"])
    assert "image_bind_f1_3.weight" in old_keys
    with caplog.at_level(logging.INFO, logger="ibllm_lab.train"):
        train_adapter(world, _phase_cfg("pretrain"), llama, out, feats, **kw)
    assert "starting afresh" in caplog.text
    keys = set(safe_torch_load(out / CHECKPOINT)["trainable"])
    blocks = AdapterConfig.from_name("tiny").bind_blocks
    assert ("image_bind_f1_3.weight" in keys) == (blocks >= 3) and keys != old_keys


def test_ungated_and_input_token_variants_train_their_own_keys(small_world_and_lm, tmp_path):
    from ibllm_lab.io import safe_torch_load
    from ibllm_lab.train import adapter_config, train_adapter

    world, llama, feats = small_world_and_lm
    blocks = range(1, AdapterConfig.from_name("tiny").bind_blocks + 1)
    bind = {"image_bind_proj.weight", "image_bind_proj.bias"} | {
        f"image_bind_{p}_{k}.weight" for p in ("norm", "f1", "f2", "f3") for k in blocks
    }
    for overrides, expected in (
        ({"injection": "ungated", "query_layer": 1}, bind | {"prefix_query.weight"}),
        ({"injection": "input_token", "query_layer": 0}, bind),
    ):
        out = tmp_path / overrides["injection"]
        train_adapter(
            world, _phase_cfg("pretrain"), llama, out, feats,
            adapter_overrides=overrides, max_examples=8, progress=False,
        )  # fmt: skip
        assert set(safe_torch_load(out / CHECKPOINT)["trainable"]) == expected, overrides
    with pytest.raises(ValueError, match="unknown AdapterConfig fields"):
        adapter_config(llama, FEAT, injection="gated", gate_init=1.0)
    with pytest.raises(ValueError, match="query_layer"):
        adapter_config(llama, FEAT, query_layer=99)
