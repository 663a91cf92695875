"""The PNG of a run's figures (`--plot`; needs matplotlib, imported when a plot is drawn)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _not_measured(ax, what: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: not measured", ha="center", va="center", transform=ax.transAxes)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = results["environment"]
    with_sessions = "sessions" in results
    if with_sessions and "listening" not in results:  # --sessions-only
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        _plot_sessions(left, right, results["sessions"])
        _finish_plot(fig, env, path)
        return
    fig, axes = plt.subplots(2, 3 if with_sessions else 2, figsize=(18 if with_sessions else 12, 8), squeeze=False)
    ax = axes[0][0]
    if "listening" in results:
        samples = results["listening"].get("samples_ms", [])
        if samples:  # log bins: the median and the scheduling outliers of a shared machine both show
            ax.hist(samples, bins=np.logspace(np.log10(max(min(samples), 1e-3)), np.log10(max(samples)) + 1e-9, 40),
                    color="#4477aa")
            ax.set_xscale("log")
        med = results["listening"]["step_ms"]["median"]
        ax.axvline(med, color="k", linestyle="--", label=f"median {med:.2f} ms")
        ax.set_xlabel("listening step per 0.4 s chunk (ms): mel + encoder + decoder")
        ax.set_ylabel("chunks")
        ax.legend()
        ax.set_title("step-time distribution")
    else:
        _not_measured(ax, "listening step")

    ax = axes[0][1]
    if "ttfr_split_ms" in results:
        bottom = 0.0
        colours = ["#ccbb44", "#66ccee", "#4477aa", "#ee6677"]
        for (name, value), colour in zip(results["ttfr_split_ms"].items(), colours):
            ax.bar(["stream stages"], [value], bottom=bottom, label=f"{name} {value:.2f} ms", color=colour)
            bottom += value
        if results.get("session", {}).get("ttfr_ms", {}).get("n"):
            ax.bar(["end to end (Session)"], [results["session"]["ttfr_ms"]["median"]], color="#aa3377",
                   label=f"end to end {results['session']['ttfr_ms']['median']:.2f} ms")
        ax.set_ylabel("ms (medians)")
        ax.set_title("TTFR split")
        ax.legend(fontsize=8)
    else:
        _not_measured(ax, "TTFR")

    ax = axes[1][0]
    rows = [r for r in results.get("context", []) if "skipped" not in r]
    if rows:
        ax.errorbar([r["mean_position"] for r in rows], [r["step_ms"]["median"] for r in rows],
                    yerr=[[0] * len(rows), [r["step_ms"]["p90"] - r["step_ms"]["median"] for r in rows]],
                    marker="o", capsize=4)
        ax.set_xlabel("tokens in the KV cache")
        ax.set_ylabel("decoder listening step (ms, median, bar to p90)")
        ax.set_title("step time vs context length")
    else:
        _not_measured(ax, "step vs context")

    ax = axes[1][1]
    labels, values = [], []
    for row in results.get("precisions", []):
        labels.append(f"{row['precision']}")
        values.append(row["decoder_step_ms"]["median"])
    if "torch" in results:
        t = results["torch"]["listen_step_ms"]
        labels += ["listenloop\n(enc+dec)", "PyTorch\n(enc+dec)"]
        values += [t["listenloop"]["median"], t["torch"]["median"]]
    if labels:
        ax.bar(labels, values, color="#228833")
        ax.set_ylabel("ms (median)")
        ax.set_title("decoder step by precision; listening step vs PyTorch")
    else:
        ax.axis("off")

    if with_sessions:
        _plot_sessions(axes[0][2], axes[1][2], results["sessions"])
    _finish_plot(fig, env, path)


def _plot_sessions(ax_throughput, ax_step, figures: dict) -> None:
    runs = list(figures["runs"].values())
    ax = ax_throughput
    ax.bar([str(r["sessions"]) for r in runs], [r["chunks_per_s"] for r in runs], color="#4477aa")
    ax.set_xlabel("sessions at once on one Runtime")
    ax.set_ylabel("chunks/s, all sessions")
    ax.set_title(f"aggregate throughput ({figures['recording']})")
    ax = ax_step
    ax.errorbar([r["sessions"] for r in runs], [r["step_ms"]["median"] for r in runs],
                yerr=[[r["step_ms"]["median"] - r["step_ms"]["min"] for r in runs],
                      [r["step_ms"]["max"] - r["step_ms"]["median"] for r in runs]], marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["sessions"] for r in runs], [str(r["sessions"]) for r in runs])
    ax.minorticks_off()
    ax.set_xlabel("sessions at once")
    ax.set_ylabel("listening step per session (ms, median; bar: min..max)")
    ax.set_title("per-stream step")


def _finish_plot(fig, env: dict, path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(f"{env['model']} {env['precision']} | {env['device']} | {','.join(env['providers'])} | "
                 f"ORT {env['onnxruntime']} | load {env['load_average'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
