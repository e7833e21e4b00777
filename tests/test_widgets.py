"""The embedding-arithmetic mixer, driven through the widgets' own API (``.value``)."""

from __future__ import annotations

import pytest
import torch

from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.model import ImageBindLLM, format_prompt
from ibllm_lab.tokenizer import Tokenizer, train_tokenizer
from ibllm_lab.widgets import Mixer, model_answerer

pytest.importorskip("ipywidgets")


def describe(selection, question):
    """A real (model-free) answerer: what it was asked with."""
    parts = [f"{m}={k}@{w:.2f}" for m, (k, w) in sorted(selection.items())]
    return f"{question} | " + (", ".join(parts) or "text-only")


def test_every_widget_change_regenerates_the_answer():
    options = {"Image": ["s1", "s2"], "audio": [("a sound", "s3"), ("another", "s4")]}
    mixer = Mixer(options, describe, question="What is it?", weights={"Audio": 0.5})
    assert mixer.last_answer == "What is it? | Audio=s3@0.50, Image=s1@1.00"
    assert "Image s1: 0.67" in mixer.weights_view.value and mixer.n_answers == 1
    mixer.dropdowns["Image"].value = "s2"
    assert mixer.last_answer == "What is it? | Audio=s3@0.50, Image=s2@1.00"
    mixer.dropdowns["Audio"].value = "s4"
    mixer.sliders["Audio"].value = 1.0
    assert mixer.last_answer.endswith("Audio=s4@1.00, Image=s2@1.00")
    assert "Audio s4: 0.50" in mixer.weights_view.value
    mixer.sliders["Image"].value = 0.0  # weight 0 drops the modality
    assert mixer.selection() == {"Audio": ("s4", 1.0)}
    mixer.sliders["Audio"].value = 0.0
    assert mixer.last_answer == "What is it? | text-only"
    mixer.question.value = "Colour?"
    assert mixer.last_answer == "Colour? | text-only" and mixer.n_answers == 7
    assert mixer.answer.value == "<b>answer:</b> Colour? | text-only"
    with pytest.raises(ValueError):
        Mixer({}, describe)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    words = ["red circle", "blue square", "a green ring", "describe the scene", "what colour"]
    sentences = [f"{a} and {b}" for a in words for b in words] * 4
    path = train_tokenizer(sentences, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)
    tok = Tokenizer(path)
    llama = LlamaConfig.from_name("tiny", vocab_size=tok.n_words, dim=32, n_layers=2, n_heads=2)
    # three bind blocks: an untrained linear bind network of this size barely moves the
    # greedy answer, and the test needs answers that depend on the features
    adapter = AdapterConfig.from_name(
        "tiny", encoder_dim=8, query_layer=2, lora_rank=0, bind_blocks=3
    )
    torch.manual_seed(0)
    model = ImageBindLLM(llama, adapter, tokenizer=tok, device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():  # open the gates so that the features change the answer
        for name, p in model.named_parameters():
            if name.endswith("attention.gate"):
                p.fill_(3.0)
    return model


def test_model_answerer_matches_the_models_own_generate(tiny_model):
    gen = torch.Generator().manual_seed(0)
    feats = {"Image": (["i0", "i1"], torch.randn(2, 8, generator=gen)),
             "Audio": (["a0", "a1"], torch.randn(2, 8, generator=gen))}  # fmt: skip
    answer = model_answerer(tiny_model, feats, max_gen_len=6)
    mixer = Mixer({"Image": ["i0", "i1"], "Audio": ["a0", "a1"]}, answer, question="what colour")
    prompt = [format_prompt("what colour")]

    def direct(image_row, audio_row, audio_weight):
        inputs = {"Image": [feats["Image"][1][image_row][None], 1.0],
                  "Audio": [feats["Audio"][1][audio_row][None], audio_weight]}  # fmt: skip
        return tiny_model.generate(inputs, prompt, max_gen_len=6, temperature=0.0)[0]

    assert mixer.last_answer == direct(0, 0, 1.0)
    mixer.dropdowns["Image"].value = "i1"
    mixer.sliders["Audio"].value = 0.25
    assert mixer.last_answer == direct(1, 0, 0.25)
    answers = set()
    for row in ("a0", "a1"):
        for weight in (0.05, 1.0):
            mixer.dropdowns["Audio"].value = row
            mixer.sliders["Audio"].value = weight
            answers.add(mixer.last_answer)
    assert len(answers) > 1, "the answer must depend on the mixed inputs"
    mixer.sliders["Image"].value = mixer.sliders["Audio"].value = 0.0
    text_only = tiny_model.generate_from_feats(None, prompt, 6, temperature=0.0)[0]
    assert mixer.last_answer == text_only
