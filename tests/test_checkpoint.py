"""Checkpoints: Meta folders (sharded), the released adapter layout (``llama.`` and ``llma.``),
save / load round trips, strict key checks, refusal of code-running pickles, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import ibllm_lab.checkpoint as ckpt
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.io import atomic_save_torch, safe_torch_load, write_json_atomic
from ibllm_lab.llama import Llama
from ibllm_lab.model import ImageBindLLM
from ibllm_lab.peft import adapter_keys
from ibllm_lab.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (two threads spin-wait on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ENC = 8


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    corpus = ["a red circle moves left", "two blue squares are static", "Describe 123"] * 30
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer", 300)


@pytest.fixture(scope="module")
def llama_cfg(tokenizer_path):
    return LlamaConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        vocab_size=Tokenizer(tokenizer_path).n_words,
        multiple_of=16,
        max_seq_len=64,
    )


@pytest.fixture(scope="module")
def base(llama_cfg):
    torch.manual_seed(0)
    llama = Llama(llama_cfg)
    llama.init_weights(std=0.1)
    return llama


def write_meta_folder(folder, llama: Llama, cfg: LlamaConfig, n_shards: int) -> None:
    """Split the weights as Meta's model-parallel checkpoints are split."""
    folder.mkdir(parents=True, exist_ok=True)
    split_dim = {
        "wq": 0,
        "wk": 0,
        "wv": 0,
        "w1": 0,
        "w3": 0,
        "output": 0,
        "wo": 1,
        "w2": 1,
        "tok_embeddings": 1,
    }
    shards = [{} for _ in range(n_shards)]
    for key, value in llama.state_dict().items():
        name = key.split(".")[-2]
        parts = (
            [value] * n_shards
            if key.endswith("norm.weight")
            else value.chunk(n_shards, dim=split_dim[name])
        )
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    shards[0]["rope.freqs"] = torch.randn(cfg.head_dim // 2)  # LLaMA 1 files carry it
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = cfg.to_params_json() | {"vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))


def test_sharded_meta_folder_loads(tmp_path, base, llama_cfg):
    write_meta_folder(tmp_path / "7B", base, llama_cfg, n_shards=2)
    state, cfg = ckpt.load_llama(tmp_path / "7B", max_seq_len=64)
    assert cfg == llama_cfg
    loaded = Llama(cfg)
    ckpt.load_base_weights(loaded, state)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    assert torch.equal(loaded(tokens), base(tokens))


def test_save_llama_writes_meta_format(tmp_path, base, llama_cfg, tokenizer_path):
    ckpt.save_llama(base, llama_cfg, tmp_path / "m", tokenizer_model=tokenizer_path)
    assert sorted(os.listdir(tmp_path / "m")) == [
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    state = safe_torch_load(tmp_path / "m" / "consolidated.00.pth")
    assert list(state) == list(base.state_dict())
    state, cfg = ckpt.load_llama(tmp_path / "m", max_seq_len=64)
    assert cfg == llama_cfg


@pytest.fixture()
def reference_layout(tmp_path, base, llama_cfg, tokenizer_path):
    """``llama_dir/7B/{params.json, consolidated.00.pth}`` + ``llama_dir/tokenizer.model``."""
    ckpt.save_llama(base, llama_cfg, tmp_path / "llama" / "7B")
    (tmp_path / "llama" / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return tmp_path / "llama"


def trained_model(llama_dir, **adapter) -> ImageBindLLM:
    cfg = AdapterConfig(**({"encoder_dim": ENC, "query_layer": 2, "lora_rank": 4} | adapter))
    model = ckpt.load(llama_dir, adapter_cfg=cfg)
    g = torch.Generator().manual_seed(1)
    keys = adapter_keys(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in keys:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _same_logits(a, b, vocab):
    tokens = torch.randint(0, vocab, (2, 9))
    feats = torch.randn(2, ENC)
    return torch.equal(a.logits(tokens, feats), b.logits(tokens, feats))


@pytest.mark.parametrize("prefix", ["llama.", "llma."])
def test_released_adapter_layout_loads(tmp_path, reference_layout, llama_cfg, prefix):
    model = trained_model(reference_layout)
    state = {
        k.replace("llama.", prefix, 1): v
        for k, v in model.state_dict().items()
        if k in adapter_keys(model)
    }
    torch.save({"model": state}, tmp_path / "7B.pth")
    loaded = ckpt.load(reference_layout, tmp_path / "7B.pth", llama_type="7B")
    assert loaded.adapter_cfg == model.adapter_cfg  # inferred from keys and shapes
    assert _same_logits(model, loaded, llama_cfg.vocab_size)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("injection,query_len", [("gated", 1), ("prefix_attention", 2)])
def test_save_load_round_trip_gives_same_logits(
    tmp_path, reference_layout, llama_cfg, suffix, injection, query_len
):
    model = trained_model(reference_layout, injection=injection, query_len=query_len)
    path = ckpt.save_trainable(
        model, tmp_path / f"adapter{suffix}", {"phase": "finetune", "step": 3}
    )
    assert not list(tmp_path.glob("*.tmp"))
    loaded = ckpt.load(reference_layout, path)
    assert _same_logits(model, loaded, llama_cfg.vocab_size)
    fresh = ckpt.load(reference_layout, adapter_cfg=model.adapter_cfg)
    meta = ckpt.load_adapter(fresh, path)
    assert meta["phase"] == "finetune" and meta["step"] == 3
    assert meta["adapter_config"]["injection"] == injection
    assert _same_logits(model, fresh, llama_cfg.vocab_size)


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k in adapter_keys(model)}


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, reference_layout):
    model = trained_model(reference_layout)
    state = _adapter_state(model)
    del state["llama.layers.1.attention.gate"]
    state["llama.layers.0.attention.extra"] = torch.zeros(1)
    state["prefix_query.weight"] = torch.zeros(3, 32)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_adapter(model, tmp_path / "bad.pth")
    message = str(info.value)
    assert "bad.pth" in message
    assert "missing keys: llama.layers.1.attention.gate" in message
    assert "unexpected keys: llama.layers.0.attention.extra" in message
    assert "prefix_query.weight: checkpoint (3, 32) vs model (2, 32)" in message


def test_base_weights_are_checked(base, llama_cfg):
    state = base.state_dict()
    state.pop("norm.weight")
    state["output.weight"] = torch.zeros(3, 3)
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys: norm\.weight") as info:
        ckpt.load_base_weights(Llama(llama_cfg), state)
    assert "output.weight: checkpoint (3, 3)" in str(info.value)


def test_adapter_from_another_llama_is_refused(tmp_path, reference_layout):
    model = trained_model(reference_layout)
    path = ckpt.save_trainable(model, tmp_path / "a.pth")
    obj = safe_torch_load(path)
    obj["llama_config"]["dim"] = 64
    torch.save(obj, path)
    with pytest.raises(ckpt.CheckpointError, match="dim: adapter 64 vs LLaMA 32"):
        ckpt.load(reference_layout, path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path, reference_layout):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"x": RunsCode(marker)}}, f, protocol=2)
    model = trained_model(reference_layout)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth"):
        ckpt.load_adapter(model, evil)
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil2.pth")
    with pytest.raises(ValueError, match="evil2.pth"):
        ckpt.load(reference_layout, tmp_path / "evil2.pth")
    assert not marker.exists()


def test_missing_files_are_named(tmp_path, reference_layout):
    with pytest.raises(FileNotFoundError, match="params.json"):
        ckpt.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        ckpt.load(reference_layout, tmp_path / "no-such.pth")
    (reference_layout / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        ckpt.load(reference_layout)


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    path = tmp_path / "state.pth"
    atomic_save_torch({"a": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save_torch({"a": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(safe_torch_load(path)["a"], torch.ones(2))
    write_json_atomic(tmp_path / "x.json", {"k": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_load_without_adapter_is_the_base_llama(reference_layout, base, llama_cfg):
    model = ckpt.load(reference_layout, adapter_cfg=AdapterConfig(encoder_dim=ENC, query_layer=1))
    tokens = torch.randint(0, llama_cfg.vocab_size, (2, 7))
    assert torch.allclose(model.logits(tokens, torch.randn(2, ENC)), base(tokens), atol=1e-6)
    state = model.state_dict()
    assert state["llama.layers.1.attention.gate"].eq(0).all()
    assert state["llama.layers.0.feed_forward.lora_w2_l2.weight"].eq(0).all()
    assert state["llama.layers.0.attention.wq.bias"].eq(0).all()
    for key in (
        "image_bind_f1_1.weight",
        "llama.layers.0.attention.lora_wq_l1.weight",
        "prefix_query.weight",
    ):
        assert torch.isfinite(state[key]).all() and state[key].std() > 0.01
    assert state["image_bind_norm_2.weight"].eq(1).all()


def test_readme_example_runs(tmp_path, reference_layout):
    """README's "Using it like the reference implementation" block, on a tiny reference-layout
    folder: the same code, with the paths, device and dtype swapped for local ones."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    model = trained_model(reference_layout)
    state = {k: v for k, v in model.state_dict().items() if k in adapter_keys(model)}
    torch.save({"model": state}, tmp_path / "7B.pth")
    code = (
        block.replace('"path/to/llama"', repr(str(reference_layout)))
        .replace('"path/to/7B.pth"', repr(str(tmp_path / "7B.pth")))
        .replace('device="cuda"', 'device="cpu"')
        .replace("torch.float16", "torch.float32")
    )
    scope = {"image_emb": torch.randn(1, ENC), "audio_emb": torch.randn(1, ENC)}
    exec(compile(code, "README.md", "exec"), scope)
    answers = scope["answers"]
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
