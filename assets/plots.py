"""PNG plots for UI metadata and reports (matplotlib, Agg backend), embedded as base64 data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (it costs about a second, and most runs and
    every command-line start import this module without drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def md_image(png: bytes, alt: str = "plot") -> str:
    return f"![{alt}]({data_uri(png)})"


def histogram_png(series: dict[str, np.ndarray], title: str, bins: int = 30) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.hist(np.asarray(values, dtype=float), bins=bins, alpha=0.6, label=name)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def line_plot_png(
    series: dict[str, list[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    x: list[float] | None = None,
    logx: bool = False,
) -> bytes:
    """One line per series over ``x`` (default 1, 2, ...), e.g. epochs or a swept parameter (``logx``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.plot(x if x is not None else range(1, len(values) + 1), values, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def _bar_colour(name: str) -> str:
    if name.startswith("baseline/"):
        return "#9e9e9e"
    if name.startswith("ensemble"):
        return "#e6841c"
    if name.startswith("caption/"):
        return "#8e6bbf"
    return "#3b78b5"


def zoomed_limits(values: list[float], margin: float = 0.08) -> tuple[float, float] | None:
    """Axis limits around ``values`` (not from 0): a margin of their range on the left, 2.5 margins on the
    right for value labels; at least 0.005 either way, so equal values still get an axis."""
    if not values:
        return None
    low, high = min(values), max(values)
    pad = max((high - low) * margin, 0.005)
    return low - pad, high + 2.5 * pad


def bar_plot_png(
    values: dict[str, float],
    title: str,
    xlabel: str,
    reference: float | None = None,
    reference_label: str = "reference",
) -> bytes:
    """Horizontal bars sorted by value, best at the top, each labelled with its value (4 decimals).

    The axis is zoomed on the values (and ``reference``, drawn as a dashed vertical line) rather than
    starting at 0, so close figures stay distinguishable. Colours: models blue, ensembles orange,
    baselines grey, generated prompts purple.
    """
    items = sorted(((k, float(v)) for k, v in values.items() if v is not None and np.isfinite(v)), key=lambda kv: kv[1])
    names, numbers = [k for k, _ in items], [v for _, v in items]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(items) + 1.2))
    ax.barh(range(len(items)), numbers, color=[_bar_colour(n) for n in names], height=0.7)
    ax.set_yticks(range(len(items)), names, fontsize=9)
    limits = zoomed_limits(numbers + ([reference] if reference is not None and np.isfinite(reference) else []))
    if limits:
        ax.set_xlim(*limits)
    for i, value in enumerate(numbers):
        ax.text(value, i, f" {value:.4f}", va="center", fontsize=8)
    if reference is not None and np.isfinite(reference):
        ax.axvline(
            reference, color="#c62828", linestyle="--", linewidth=1.2, label=f"{reference_label} ({reference:.4f})"
        )
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel + " (axis zoomed, not from 0)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig)


def grouped_bars_png(groups: dict[str, dict[str, float]], title: str, ylabel: str) -> bytes:
    """One cluster of bars per group (e.g. backbone), one bar per key (e.g. difficulty bucket)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(groups)
    keys = sorted(
        {k for g in groups.values() for k in g},
        key=lambda k: ["easy", "medium", "hard"].index(k) if k in ("easy", "medium", "hard") else 9,
    )
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        ax.bar(
            [i + j * width for i in range(len(names))], [groups[n].get(key, np.nan) for n in names], width, label=key
        )
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(names))], names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def gallery_png(images: list[bytes], captions: list[str], wrap: int = 60) -> bytes:
    """One row per image: the image on the left, its caption lines (true prompt, retrieved prompts) beside it
    in a readable size; the first line is bold."""
    plt = _pyplot()
    import textwrap

    from PIL import Image

    fig, axes = plt.subplots(
        len(images), 2, figsize=(10, 2.6 * len(images)), squeeze=False, gridspec_kw={"width_ratios": [1, 2.6]}
    )
    for (image_ax, text_ax), data, caption in zip(axes, images, captions):
        image_ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        image_ax.set_axis_off()
        text_ax.set_axis_off()
        lines = caption.splitlines() or [""]
        y = 1.0
        for n, line in enumerate(lines):
            wrapped = textwrap.fill(line, wrap, subsequent_indent="    ")
            text_ax.text(
                0,
                y,
                wrapped,
                transform=text_ax.transAxes,
                va="top",
                fontsize=10.5,
                fontweight="bold" if n == 0 else "normal",
            )
            y -= 0.085 * (wrapped.count("\n") + 1) + 0.03  # a 10.5 pt line is ~0.085 of a 2.6 in row
    fig.tight_layout()
    return _png(fig)
