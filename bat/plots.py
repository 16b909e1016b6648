"""The layer-weight chart and its text version (probe_cgp.py's gates.png and terminal summary)."""
import numpy as np


def text_bars(values, width=40):
    """One line per layer: its weight and a bar scaled to the largest."""
    top = max(values) if values and np.isfinite(values).all() and max(values) > 0 else 1.0
    return "\n".join(f"  layer {i + 1:2d} {v:6.3f} {'#' * max(1, round(width * v / top)) if np.isfinite(v) else '?'}"
                     for i, v in enumerate(values))


def save_gates_png(path, gates, title, std=None):
    """A bar chart of the learned layer weights (std: error bars, e.g. over folds), uniform 1/L dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(gates) + 2), 3.2))
    layers = np.arange(1, len(gates) + 1)
    ax.bar(layers, gates, yerr=std, color="#3b75af", capsize=3)
    ax.axhline(1 / len(gates), color="grey", lw=0.8, ls="--", label="uniform 1/L")
    ax.set(xlabel="encoder layer (block)", ylabel="gate weight (softmax)", xticks=layers)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
