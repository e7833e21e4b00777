"""The embedding-arithmetic mixer: dropdowns pick one input per modality, sliders weight them,
and the model's answer is regenerated whenever anything changes.

``Mixer`` holds the widgets and the callback logic, independent of any model: it calls an
``answer(selection, question) -> str`` function. ``model_answerer`` builds that function
from an ``ImageBindLLM`` and precomputed features, so a slider move costs one short greedy
generation and no encoder pass. ipywidgets is imported lazily (a notebook extra).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ibllm_lab.modality import Modality, normalise_weights

# selection: {modality value ("Image"): (input key, weight > 0)}; question -> answer text
Answerer = Callable[[Mapping[str, tuple[str, float]], str], str]


class Mixer:
    """Widgets: per modality a ``Dropdown`` (which input) and a ``FloatSlider`` (its weight),
    a question ``Combobox``, and ``HTML`` read-outs of the normalised weights and the answer.

    Changing any widget's ``value`` calls ``answer`` again; the latest text is
    ``mixer.last_answer`` and is shown in ``mixer.answer``. Modalities with weight 0 are left
    out of the selection; with all weights 0 the question is answered text-only.
    """

    def __init__(
        self,
        options: Mapping[Modality | str, Sequence[str | tuple[str, str]]],
        answer: Answerer,
        question: str = "Describe the scene.",
        weights: Mapping[Modality | str, float] | None = None,
        questions: Sequence[str] = (),
    ):
        import ipywidgets as w

        if not options:
            raise ValueError("Mixer needs at least one modality in options")
        self._answer_fn = answer
        weights = {Modality.parse(k).value: float(v) for k, v in (weights or {}).items()}
        self.dropdowns: dict[str, Any] = {}
        self.sliders: dict[str, Any] = {}
        for key, choices in options.items():
            name = Modality.parse(key).value
            self.dropdowns[name] = w.Dropdown(options=list(choices), description=name)
            self.sliders[name] = w.FloatSlider(
                value=weights.get(name, 1.0), min=0.0, max=1.0, step=0.05, description="weight"
            )
        self.question = w.Combobox(
            value=question, options=list(questions), ensure_option=False, description="ask"
        )
        self.weights_view = w.HTML()
        self.answer = w.HTML()
        self.last_answer = ""
        self.n_answers = 0
        for widget in [*self.dropdowns.values(), *self.sliders.values(), self.question]:
            widget.observe(self._on_change, names="value")
        rows = [w.HBox([self.dropdowns[n], self.sliders[n]]) for n in self.dropdowns]
        self.widget = w.VBox([*rows, self.question, self.weights_view, self.answer])
        self.refresh()

    def selection(self) -> dict[str, tuple[str, float]]:
        """``{modality: (chosen input, weight)}`` for the modalities with weight > 0."""
        return {
            name: (self.dropdowns[name].value, float(self.sliders[name].value))
            for name in self.dropdowns
            if self.sliders[name].value > 0
        }

    def refresh(self) -> str:
        """Ask again with the current widget values; update the read-outs; return the answer."""
        chosen = self.selection()
        shares = normalise_weights([wt for _, wt in chosen.values()]) if chosen else []
        parts = [f"{m} {k}: {s:.2f}" for (m, (k, _)), s in zip(chosen.items(), shares, strict=True)]
        self.weights_view.value = "fused weights: " + (html.escape(", ".join(parts)) or "none")
        self.last_answer = self._answer_fn(chosen, self.question.value)
        self.n_answers += 1
        self.answer.value = f"<b>answer:</b> {html.escape(self.last_answer)}"
        return self.last_answer

    def _on_change(self, change: dict) -> None:
        self.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def model_answerer(
    model: Any,
    features: Mapping[Modality | str, tuple[Sequence[str], torch.Tensor]],
    max_gen_len: int = 32,
    use_cache: bool = False,
) -> Answerer:
    """An ``Answerer`` that fuses precomputed features and generates greedily.

    ``features``: ``{modality: (ids, (N, encoder_dim) embeddings)}`` (the format of
    ``encoders.compute_features`` and ``PrecomputedEncoder``). ``model``: an
    ``ImageBindLLM`` with a tokenizer and no encoder attached (inputs are embeddings);
    ``use_cache`` applies its visual cache when one is attached.
    """
    from ibllm_lab.model import format_prompt

    rows = {
        Modality.parse(m).value: (dict(zip(ids, range(len(ids)), strict=True)), feats)
        for m, (ids, feats) in features.items()
    }

    def answer(selection: Mapping[str, tuple[str, float]], question: str) -> str:
        prompt = [format_prompt(question)]
        if not selection:
            return model.generate_from_feats(None, prompt, max_gen_len, temperature=0.0)[0]
        inputs = {}
        for name, (key, weight) in selection.items():
            index, feats = rows[name]
            inputs[name] = [feats[index[key]][None].to(model.device), weight]  # (1, D)
        with torch.no_grad():
            fused = model.encode_inputs(inputs, use_cache=use_cache and model.cache is not None)
        return model.generate_from_feats(fused, prompt, max_gen_len, temperature=0.0)[0]

    return answer
