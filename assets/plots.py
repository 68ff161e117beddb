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
