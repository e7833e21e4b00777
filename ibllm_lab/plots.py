"""Figures for the notebooks and the report: each function takes data, returns a Figure.

Notebooks call these and pass the figure to ``NotebookOutputs.save_figure``; nothing here
shows or saves anything itself. matplotlib is imported lazily (an optional extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ibllm_lab.modality import Modality

# A fixed qualitative palette so that one modality keeps its colour across figures.
MODALITY_COLOURS = {
    Modality.IMAGE: "#1f77b4",
    Modality.VIDEO: "#ff7f0e",
    Modality.AUDIO: "#2ca02c",
    Modality.POINT: "#d62728",
    Modality.DEPTH: "#9467bd",
    Modality.TEXT: "#8c564b",
    Modality.THERMAL: "#e377c2",
    Modality.IMU: "#7f7f7f",
}


def _plt():
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- raw media


def _show_media(ax, modality: Modality, path) -> None:
    """Draw one media file on ``ax`` in the way that modality is best looked at."""
    from ibllm_lab import media

    if modality == Modality.IMAGE:
        ax.imshow(media.read_image(path))
    elif modality == Modality.VIDEO:
        clip = media.read_video(path)  # (T, H, W, 3)
        ax.imshow(np.concatenate([clip[0], clip[len(clip) // 2], clip[-1]], axis=1))
    elif modality == Modality.DEPTH:
        ax.imshow(media.read_depth(path), cmap="viridis")
    elif modality == Modality.AUDIO:
        wave = media.read_audio(path)
        spec = media.AudioPreprocess(sample_rate=16000).log_mel(wave[None])[0]  # (mels, frames)
        ax.imshow(spec.numpy(), origin="lower", aspect="auto", cmap="magma")
    elif modality == Modality.POINT:
        pts = media.read_points(path)  # (P, 3|6): xyz [+ rgb]
        colours = np.clip(pts[:, 3:6], 0, 1) if pts.shape[1] == 6 else "k"
        ax.scatter(pts[:, 0], pts[:, 1], c=colours, s=4)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention: y grows downwards, so "top left" looks top left
    else:
        raise ValueError(f"no media view for {modality.value}")
    ax.set_xticks([])
    ax.set_yticks([])


def scene_gallery(world: Any, scenes: Sequence[Any], modalities: Sequence[Modality]):
    """A grid: one row per scene, one column per modality (video: first, middle, last frame;
    audio: log-mel spectrogram; points: x-y projection in their colours)."""
    plt = _plt()
    rows, cols = len(scenes), len(modalities)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.0 * rows), squeeze=False)
    for r, scene in enumerate(scenes):
        for c, modality in enumerate(modalities):
            _show_media(axes[r, c], modality, world.path(scene, modality))
            if r == 0:
                axes[r, c].set_title(modality.value)
        attrs = scene.attributes
        label = f"{attrs['count']} {attrs['size']}\n{attrs['color']} {attrs['shape']}"
        axes[r, 0].set_ylabel(f"{scene.id}\n{label}", fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- embeddings


def embedding_scatter(
    xy: np.ndarray, groups: Mapping[str, Sequence[str]], title: str = "", max_legend: int = 12
):
    """Scatter ``xy`` (N, 2) once per grouping: ``groups = {"modality": labels (N,), ...}``,
    one panel per grouping, points coloured by label."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.4), squeeze=False)
    for ax, (name, labels) in zip(axes[0], groups.items(), strict=True):
        labels = np.asarray([str(x) for x in labels])
        for i, value in enumerate(sorted(set(labels))):
            colour = _label_colour(value, i)
            mask = labels == value
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.7, color=colour, label=value)
        if len(set(labels)) <= max_legend:
            ax.legend(markerscale=2, fontsize=7, loc="best")
        ax.set_title(f"{title} by {name}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def _label_colour(value: str, i: int) -> str:
    try:
        return MODALITY_COLOURS[Modality.parse(value)]
    except ValueError:
        named = {"red", "green", "blue", "yellow", "purple", "orange"}
        return value if value in named else f"C{i % 10}"


def heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str = "",
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    xlabel: str = "",
    ylabel: str = "",
):
    """An annotated heatmap of ``matrix`` (len(rows), len(cols))."""
    plt = _plt()
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 0.8 + 0.45 * len(rows)))
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if matrix.size <= 200:
        lo, hi = im.get_clim()
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                light = (v - lo) / max(hi - lo, 1e-12) > 0.6  # dark text on light cells
                colour = "k" if light else "w"
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=colour)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- curves


def curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
):
    """Line plot of ``{label: (x, y)}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def grouped_bars(
    values: Mapping[str, Mapping[str, float]], title: str = "", ylabel: str = "", ylim=None
):
    """Bars of ``{group: {series: value}}``: one cluster per group, one bar per series."""
    plt = _plt()
    n_series = len({s for v in values.values() for s in v})
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(values) * max(1, n_series) / 2), 3.6))
    _bars(ax, values, title, ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    fig.tight_layout()
    return fig


def bar_panels(panels: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = ""):
    """One grouped-bar panel per entry of ``{panel title: {group: {series: value}}}``, side
    by side (e.g. one panel per benchmark metric, one cluster per variant, one bar per
    evaluation condition); a series keeps its colour across panels."""
    plt = _plt()
    n_groups = max((len(v) for v in panels.values()), default=1)
    width = max(4.5, 0.45 * n_groups + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items(), strict=True):
        _bars(ax, values, name, "")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _bars(ax, values: Mapping[str, Mapping[str, float]], title: str, ylabel: str) -> None:
    """Draw ``{group: {series: value}}`` on ``ax``: clusters of bars, series sorted by name
    (so colours follow names), a legend when there is more than one series."""
    groups = list(values)
    series = sorted({s for v in values.values() for s in v})
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, name in enumerate(series):
        heights = [values[g].get(name, np.nan) for g in groups]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set(title=title, ylabel=ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


# ----------------------------------------------------------------------------- projections


def knn_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN of the rows of ``x`` (N, D) with faiss: ``(indices, distances)``,
    each (N, k), self included first (UMAP's ``precomputed_knn`` format)."""
    import faiss

    x = np.ascontiguousarray(x, dtype="float32")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, k)
    return ids.astype(np.int64), np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0, n_neighbors: int = 15):
    """2-D coordinates (N, 2) of embeddings ``x`` (N, D): ``"pca"`` (fast, linear) or
    ``"umap"`` (cosine UMAP over a faiss kNN graph, which skips UMAP's slow neighbour
    search; ``seed`` makes it deterministic)."""
    x = np.asarray(x, dtype=np.float32)
    if method == "pca":
        centred = x - x.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        return xy * np.sign(xy[np.abs(xy).argmax(0), [0, 1]])  # fix the sign: deterministic
    if method == "umap":
        import umap

        knn = knn_graph(x, n_neighbors)
        reducer = umap.UMAP(
            n_neighbors=n_neighbors,
            metric="cosine",
            random_state=seed,
            precomputed_knn=(knn[0], knn[1], None),
        )
        return reducer.fit_transform(x)
    raise ValueError(f"projection method {method!r}: expected 'pca' or 'umap'")


def sweep_panels(
    df: Any, axes: Sequence[str], metric: str, base: Mapping[str, float], group: str = "modality"
):
    """One panel per swept axis: ``metric`` against that axis (log scale when it spans more
    than a decade), one line per ``group``; the other axes held at ``base``."""
    plt = _plt()
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.4), squeeze=False)
    for ax, axis in zip(panels[0], axes, strict=True):
        others = [a for a in axes if a != axis]
        rows = df[np.logical_and.reduce([df[a] == base[a] for a in others])] if others else df
        for i, (name, part) in enumerate(rows.groupby(group, sort=True)):
            part = part.sort_values(axis)
            ax.plot(part[axis], part[metric], marker="o", label=name, color=_label_colour(name, i))
        values = rows[axis][rows[axis] > 0]
        if len(values) and values.max() / values.min() > 10:
            ax.set_xscale("log")
        ax.set(xlabel=axis, ylabel=metric, title=f"{metric} vs {axis}")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig
