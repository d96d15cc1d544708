"""The report's figure, ``pareto.png``: val_bpb against evaluation time, one panel per time axis.

The first panel is the reference's predicted seconds on 8xH100 when the results have them (the time the budget is
about; else a second panel of pgttt's projected 8-GPU seconds), beside the eval seconds measured on the server.
Each (checkpoint, dataset) group gets its points, their paired intervals against the group's best as error
bars, its Pareto frontier labelled with the settings that vary, its no-TTT points boxed, and the budget as a
dashed line. matplotlib with the Agg backend, imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

from pgttt.client.report_rows import Row, budget_time, by_group, pareto_front, settings_label, varying_fields


def plot_pareto(path: Path, rows: list[Row], columns: list[str], budget_s: float) -> None:
    """Draw the figure of ``rows`` into ``path`` (PNG); ``columns`` are the field columns a label may show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_s", "eval seconds (measured on the server)")]
    if any(r.reference_s is not None for r in rows):  # the time axis that decides the budget comes first
        panels.insert(0, ("reference_s", "reference seconds on 8xH100 (predicted; pgttt.budget)"))
    elif any(r.projected_8gpu_s is not None for r in rows):
        panels.append(("projected_8gpu_s", "projected seconds on 8 GPUs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    groups = by_group(rows)
    shown = {name: varying_fields(group, columns) for name, group in groups.items()}
    budget = budget_time(rows)
    for ax, (time, label) in zip(axes[0], panels, strict=True):
        for (checkpoint, dataset), group in groups.items():
            timed = [r for r in group if r.metric(time) is not None]
            if not timed:
                continue
            name = f"{checkpoint} / {dataset}" if len(groups) > 1 else "points"
            dots = ax.scatter([r.metric(time) for r in timed], [r.val_bpb for r in timed], s=22, alpha=0.6, label=name)
            color = dots.get_facecolor()[0]
            paired = [r for r in timed if r.delta_low is not None and r.delta_high is not None and r.delta_bpb]
            if paired:  # the best of the group is the reference of every interval: it has none
                below = [max(r.delta_bpb - r.delta_low, 0.0) for r in paired]
                above = [max(r.delta_high - r.delta_bpb, 0.0) for r in paired]
                ax.errorbar(
                    [r.metric(time) for r in paired],
                    [r.val_bpb for r in paired],
                    yerr=[below, above],
                    fmt="none",
                    ecolor=color,
                    elinewidth=0.8,
                    capsize=2,
                    alpha=0.7,
                    label="paired interval vs the best",
                )
            front = pareto_front(timed, time)
            ax.plot(
                [r.metric(time) for r in front],
                [r.val_bpb for r in front],
                "-o",
                color=color,
                ms=4,
                lw=1.2,
                label="Pareto frontier",
            )
            for r in front:
                ax.annotate(
                    settings_label(r, shown[(checkpoint, dataset)]),
                    (r.metric(time), r.val_bpb),
                    fontsize=6,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            base = [r for r in timed if r.is_baseline]
            if base:
                ax.scatter(
                    [r.metric(time) for r in base],
                    [r.val_bpb for r in base],
                    marker="s",
                    s=60,
                    facecolors="none",
                    edgecolors="black",
                    label="no TTT (ttt_epochs=0)",
                )
        slowest = max((r.metric(time) for r in rows if r.metric(time) is not None), default=None)
        if time == budget and slowest is not None:
            if budget_s <= 1.25 * slowest:
                ax.axvline(budget_s, color="grey", ls="--", lw=1, label=f"budget {budget_s:g} s")
            else:  # a line far to the right would squeeze every point against the axis
                ax.set_title(f"every point within the {budget_s:g} s budget", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("val_bpb (lower is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no timings in the results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("val_bpb against evaluation time")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # labels of the frontier may reach past the axes
    plt.close(fig)
