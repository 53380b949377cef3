"""The quickstart's picture: SFT loss, GRPO reward and held-out accuracy, in one PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_quickstart(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Draw loss (SFT steps), reward (GRPO steps) and accuracy (per stage) from quickstart metric rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_rows = [r for r in rows if r.get("phase") == "sft" and r.get("train_mean_nll") is not None]
    rl_rows = [r for r in rows if r.get("phase") == "grpo" and r.get("reward/mean") is not None]
    acc_rows = [r for r in rows if r.get("phase") == "eval"]
    fig, (ax_loss, ax_reward, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot([r["step"] for r in sft_rows], [r["train_mean_nll"] for r in sft_rows])
    ax_loss.set(title="SFT loss (NLL per answer token)", xlabel="SFT step", ylabel="NLL")
    ax_reward.plot(
        [r["step"] for r in rl_rows],
        [r["reward/mean"] for r in rl_rows],
        color="tab:green",
        label="sampled reward",
    )
    rl_acc = [r for r in rl_rows if r.get("test/accuracy") is not None]
    if rl_acc:
        ax_reward.plot(
            [r["step"] for r in rl_acc], [r["test/accuracy"] for r in rl_acc], "o--", color="tab:blue",
            label="held-out accuracy (greedy)",
        )  # fmt: skip
        ax_reward.legend(loc="upper left")
    ax_reward.set(
        title="GRPO (exact-answer reward)", xlabel="GRPO step", ylabel="fraction correct", ylim=(0, 1)
    )
    labels = [r["stage"] for r in acc_rows]
    values = [r["accuracy"] for r in acc_rows]
    bars = ax_acc.bar(labels, values, color=["tab:gray", "tab:blue", "tab:green"][: len(values)])
    for bar, value in zip(bars, values, strict=True):
        ax_acc.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.0%}", ha="center")
    ax_acc.set(title="Held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
