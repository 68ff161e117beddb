"""PNG plots for UI metadata and reports (matplotlib, Agg backend), embedded as base64 data URIs."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def md_image(png: bytes, alt: str = "plot") -> str:
    return f"![{alt}]({data_uri(png)})"


def histogram_png(series: dict[str, np.ndarray], title: str, bins: int = 30) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.hist(np.asarray(values, dtype=float), bins=bins, alpha=0.6, label=name)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def line_plot_png(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def bar_plot_png(values: dict[str, float], title: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(values)
    ax.bar(names, [values[n] for n in names])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    return _png(fig)


def grouped_bars_png(groups: dict[str, dict[str, float]], title: str, ylabel: str) -> bytes:
    """One cluster of bars per group (e.g. backbone), one bar per key (e.g. difficulty bucket)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(groups)
    keys = sorted({k for g in groups.values() for k in g}, key=lambda k: ["easy", "medium", "hard"].index(k) if k in ("easy", "medium", "hard") else 9)
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ax.bar([i + j * width for i in range(len(names))], [groups[n].get(key, np.nan) for n in names], width, label=key)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))], names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def gallery_png(images: list[bytes], captions: list[str]) -> bytes:
    """Images side by side with a caption under each (true prompt and retrieved prompts)."""
    import io as _io
    import textwrap

    from PIL import Image

    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 4.6), squeeze=False)
    for ax, data, caption in zip(axes[0], images, captions):
        ax.imshow(Image.open(_io.BytesIO(data)).convert("RGB"))
        ax.set_axis_off()
        wrapped = "\n".join(textwrap.fill(line, 42) for line in caption.splitlines())
        ax.text(0, -0.02, wrapped, transform=ax.transAxes, va="top", fontsize=6)
    return _png(fig)
