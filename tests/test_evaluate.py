"""The evaluation loop: end-to-end scores, JSONL predictions, resume, missing features."""

import json

import pandas as pd
import pytest
import torch

from ibllm_lab import evaluate as ev
from ibllm_lab.evalsets import load_benchmark, make_mini_benchmarks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ibllm_lab.world import WorldConfig, generate_world

    return generate_world(WorldConfig.from_name("quick", n_scenes=40), tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def mini(world, tmp_path_factory):
    return make_mini_benchmarks(world, tmp_path_factory.mktemp("mini"), n=5, seed=1)


@pytest.fixture(scope="module")
def features(world):
    """One-hot features: row k identifies scene k, so a model can tell scenes apart."""
    eye = torch.eye(len(world.scenes))
    return [s.id for s in world.scenes], eye


class Oracle:
    """Answers every benchmark item correctly from (scene feature, prompt): a stand-in model
    whose right answers must come out of the harness as perfect scores."""

    def __init__(self, benchmarks, scene_ids, fail_after=None):
        fmt = ev._format_prompt()
        self.scene_ids = scene_ids
        self.answers = {}
        for b in benchmarks:
            for it in b.items:
                self.answers[(it.image, fmt(b.instruction(it)))] = it.answers[0]
        self.prompts = []
        self.fail_after = fail_after
        self.feats_seen = []

    def generate_from_feats(self, feats, prompts, max_gen_len=32, temperature=0.0, **kw):
        if self.fail_after is not None and len(self.prompts) >= self.fail_after:
            raise KeyboardInterrupt  # an interruption halfway
        self.prompts += prompts
        self.feats_seen.append(None if feats is None else feats.shape)
        if feats is None:
            return ["no"] * len(prompts)
        scenes = [self.scene_ids[int(i)] for i in feats.argmax(dim=1)]  # (B,) scene indices
        return [self.answers[(s, p)] for s, p in zip(scenes, prompts, strict=True)]


@pytest.fixture(scope="module")
def tiny_model(world, tmp_path_factory):
    """A tiny real ImageBindLLM (random weights) whose encoder width is the one-hot width."""
    from ibllm_lab.config import AdapterConfig, LlamaConfig
    from ibllm_lab.model import ImageBindLLM, format_prompt
    from ibllm_lab.tokenizer import Tokenizer, train_tokenizer

    sentences = [c for s in world.scenes for c in s.captions] + ["Please answer yes or no."]
    sentences += [format_prompt("What colour are the objects in the image?")] * 20
    tok = Tokenizer(train_tokenizer(sentences, tmp_path_factory.mktemp("tok") / "t", 300))
    torch.manual_seed(0)
    llama = LlamaConfig.from_name(
        "tiny", vocab_size=tok.n_words, n_layers=2, dim=64, max_seq_len=512
    )
    adapter = AdapterConfig.from_name("tiny", encoder_dim=len(world.scenes), query_layer=2)
    model = ImageBindLLM(llama, adapter, tokenizer=tok, device="cpu")
    with torch.no_grad():  # open the gates so that the features change the output
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
    return model


class Interrupted(RuntimeError):
    pass


class StopAfter:
    """Delegates to a real model and raises after ``n`` calls (a crash halfway); records
    the prompts it was asked to generate."""

    def __init__(self, model, n=None):
        self.model, self.n, self.calls, self.prompts = model, n, 0, []

    def parameters(self):
        return self.model.parameters()

    def generate_from_feats(self, feats, prompts, **kw):
        if self.n is not None and self.calls >= self.n:
            raise Interrupted
        self.calls += 1
        self.prompts += prompts
        return self.model.generate_from_feats(feats, prompts, **kw)


def test_real_model_resume_equals_uninterrupted_run(tiny_model, mini, features, tmp_path):
    bench = load_benchmark(mini["mmbench"])
    kw = {"features": features, "batch_size": 4, "max_gen_len": 3, "limit": 8}
    full = ev.evaluate(StopAfter(tiny_model), bench, tmp_path / "full", **kw)
    with pytest.raises(Interrupted):
        ev.evaluate(StopAfter(tiny_model, n=1), bench, tmp_path / "cut", **kw)
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 4
    rest = StopAfter(tiny_model)
    resumed = ev.evaluate(rest, bench, tmp_path / "cut", **kw)
    assert rest.calls == 1 and len(rest.prompts) == 4  # the first batch was not redone

    def preds(d):
        lines = (d / "predictions.jsonl").read_text().splitlines()
        return {r["id"]: r["prediction"] for r in map(json.loads, lines)}

    assert preds(tmp_path / "cut") == preds(tmp_path / "full")
    pd.testing.assert_frame_equal(resumed, full)


def test_real_model_blind_and_cached_runs(tiny_model, mini, features, tmp_path):
    from ibllm_lab.cache import TorchCache

    bench = load_benchmark(mini["mme"])
    kw = {"batch_size": 8, "max_gen_len": 2, "limit": 8}
    blind = ev.evaluate(tiny_model, bench, tmp_path / "blind", modality=None, **kw)
    assert _scores(blind)["n"] == 8
    with pytest.raises(ValueError, match="visual cache"):
        ev.evaluate(tiny_model, bench, tmp_path / "c", features=features, use_cache=True, **kw)
    tiny_model.cache = TorchCache(features[1])
    try:
        cached = ev.evaluate(tiny_model, bench, tmp_path / "c", features=features,
                             use_cache=True, **kw)  # fmt: skip
    finally:
        tiny_model.cache = None
    assert _scores(cached)["n"] == 8


def _scores(table: pd.DataFrame) -> dict[str, float]:
    return dict(zip(table.metric, table.value, strict=True))


def test_oracle_gets_perfect_scores_on_every_mini_benchmark(mini, features, tmp_path):
    benches = {k: load_benchmark(p) for k, p in mini.items()}
    model = Oracle(benches.values(), features[0])
    s = {k: _scores(ev.evaluate(model, b, tmp_path / k, features=features, batch_size=8))
         for k, b in benches.items()}  # fmt: skip
    assert s["vqa"]["accuracy"] == pytest.approx(100.0)
    assert s["vqa"]["n"] == len(benches["vqa"])
    assert s["mme"]["perception"] == pytest.approx(200.0 * 5)  # 4 official + "shape"
    assert s["mmbench"]["circular"] == pytest.approx(100.0)
    assert s["captions"]["CIDEr"] > 100.0 and s["captions"]["BLEU-4"] > 50.0
    table = pd.read_csv(tmp_path / "mme" / "scores.csv")
    assert set(table.columns) == {"benchmark", "modality", "metric", "value"}
    assert json.loads((tmp_path / "mme" / "scores.json").read_text())[0]["modality"] == "Image"
    lines = (tmp_path / "vqa" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(benches["vqa"])
    assert {"id", "image", "instruction", "prediction"} <= set(json.loads(lines[0]))


def test_interrupted_evaluation_resumes_without_redoing_samples(mini, features, tmp_path):
    bench = load_benchmark(mini["mme"])
    first = Oracle([bench], features[0], fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(first, bench, tmp_path, features=features, batch_size=4)
    done = [json.loads(x)["id"] for x in (tmp_path / "predictions.jsonl").read_text().split("\n")
            if x]  # fmt: skip
    assert len(done) == 4  # exactly one batch was written before the interruption
    second = Oracle([bench], features[0])
    table = ev.evaluate(second, bench, tmp_path, features=features, batch_size=4)
    assert len(second.prompts) == len(bench) - 4
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    # Every id exactly once: the first batch's samples were not generated again.
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(it.id for it in bench.items)
    assert _scores(table)["n"] == len(bench)
    third = Oracle([bench], features[0])
    ev.evaluate(third, bench, tmp_path, features=features, batch_size=4)
    assert third.prompts == []  # everything done: nothing regenerated


def test_torn_last_line_is_dropped_and_redone(mini, features, tmp_path):
    bench = load_benchmark(mini["vqa"])
    model = Oracle([bench], features[0])
    ev.evaluate(model, bench, tmp_path, features=features, limit=3)
    path = tmp_path / "predictions.jsonl"
    path.write_text(path.read_text()[:-10])  # a crash in the middle of the last line
    model = Oracle([bench], features[0])
    ev.evaluate(model, bench, tmp_path, features=features, limit=3)
    assert len(model.prompts) == 1
    assert len([json.loads(x) for x in path.read_text().splitlines()]) == 3


def test_missing_features_are_listed_or_skipped(mini, features, tmp_path):
    bench = load_benchmark(mini["mmbench"])
    ids, feats = features
    keep = {i: f for i, f in zip(ids, feats, strict=True) if i != bench.items[0].image}
    with pytest.raises(KeyError) as err:
        ev.evaluate(Oracle([bench], ids), bench, tmp_path / "a", features=keep)
    lost = [it.id for it in bench.items if it.image == bench.items[0].image]
    assert all(i in str(err.value) for i in lost[:5])
    table = ev.evaluate(Oracle([bench], ids), bench, tmp_path / "b", features=keep,
                        skip_missing=True)  # fmt: skip
    assert _scores(table)["n_questions"] < len({it.meta["index"] % 10**6 for it in bench.items})


def test_blind_run_and_feature_file(mini, features, tmp_path):
    bench = load_benchmark(mini["mme"])
    model = Oracle([bench], features[0])
    table = ev.evaluate(model, bench, tmp_path / "blind", modality=None, batch_size=64)
    assert model.feats_seen == [None] and set(table.modality) == {"none"}
    assert _scores(table)["perception"] == pytest.approx(5 * 50.0)  # always "no": acc 50, acc+ 0
    torch.save({"ids": features[0], "feats": features[1]}, tmp_path / "f.pt")
    model = Oracle([bench], features[0])
    table = ev.evaluate(model, bench, tmp_path / "audio", modality="audio",
                        features=tmp_path / "f.pt", batch_size=64)  # fmt: skip
    assert set(table.modality) == {"Audio"} and model.feats_seen[0] == (len(bench), 40)
    with pytest.raises(ValueError, match="another evaluation"):
        ev.evaluate(model, bench, tmp_path / "audio", modality="Image", features=features)


def test_cli_loads_a_saved_model_and_prints_the_table(tiny_model, mini, features, tmp_path, capsys):
    from ibllm_lab.checkpoint import save_llama, save_trainable

    save_llama(tiny_model.llama, tiny_model.llama_cfg, tmp_path / "llama",
               tokenizer_model=tiny_model.tokenizer.model_path)  # fmt: skip
    save_trainable(tiny_model, tmp_path / "adapter.pth", {"phase": "finetune"})
    torch.save({"ids": features[0], "feats": features[1]}, tmp_path / "f.pt")
    argv = ["--benchmark", str(mini["vqa"].parent), "--llama", str(tmp_path / "llama"),
            "--model", str(tmp_path / "adapter.pth"), "--modality", "Point", "--features",
            str(tmp_path / "f.pt"), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--limit", "2", "--max-gen-len", "2"]  # fmt: skip
    assert ev.cli(argv) == 0
    out = capsys.readouterr().out
    assert "mini_vqa" in out and "circular" in out and "CIDEr" in out and "Point" in out
    table = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert set(table.benchmark) == {"mini_vqa", "mini_mme", "mini_mmbench", "mini_captions"}


def test_features_from_an_encoder_and_the_benchmark_world(mini, features, tmp_path):
    from ibllm_lab.encoders import PrecomputedEncoder

    bench = load_benchmark(mini["vqa"])
    encoder = PrecomputedEncoder({"Point": features})
    model = Oracle([bench], features[0])
    table = ev.evaluate(model, bench, tmp_path, modality="Point", encoder=encoder)
    assert _scores(table)["accuracy"] == pytest.approx(100.0)
    assert (tmp_path / "features" / "Point.pt").is_file()
