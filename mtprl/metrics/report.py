"""Run report: a metrics table (``report.md``), PNG plots and ``summary.json`` from ``metrics.jsonl``.

Plots: reward and validation accuracy per step (sampled ``val-core`` accuracy, and greedy
``val-aux/.../acc/greedy@1`` when logged); mean accepted length and per-depth acceptance per step; the
draft depth the rollout chose per step (adaptive speculation) with the accepted length; response lengths
per step (mean, min-max band) and, when given, the distribution of a set of response lengths; time per
phase per step (stacked); with ``compare`` (runs side by side, the ablation) their accepted lengths and
validation accuracies. Everything but the optional lengths is computed from the JSONL log, so a report
can be rebuilt for any finished run (``write_report(run_dir, extra_summary)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

PHASES = ("gen", "reward", "old_log_prob", "ref", "adv", "update_actor", "testing", "save_checkpoint")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def _series(rows, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean_of(row: Mapping[str, Any], prefix: str, marker: str) -> float | None:
    accs = [v for k, v in row.items() if k.startswith(prefix) and marker in k and v is not None]
    return sum(accs) / len(accs) if accs else None


def _val_acc(row: Mapping[str, Any]) -> float | None:
    """Validation accuracy at the val_kwargs setting (``val-core/*/acc/*``, averaged over data sources)."""
    return _mean_of(row, "val-core/", "/acc/")


def _val_acc_greedy(row: Mapping[str, Any]) -> float | None:
    """Greedy validation accuracy (``val-aux/*/acc/greedy@1``, trainer.val_greedy)."""
    return _mean_of(row, "val-aux/", "/acc/greedy@1")


def _val_points(rows, fn) -> list[tuple[int, float]]:
    return [(r["step"], fn(r)) for r in rows if fn(r) is not None]


def _save(fig, path: Path, paths: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    paths.append(path)


def _plot_accuracy(ax, rows, label: str = "", marker: str = "s") -> None:
    for fn, what, style in ((_val_acc, "validation accuracy (val_kwargs)", "-"), (_val_acc_greedy, "greedy", "--")):
        pts = _val_points(rows, fn)
        if pts:
            ax.plot([s for s, _ in pts], [a for _, a in pts], marker=marker, linestyle=style, label=f"{label}{what}")


def plot_run(rows: list[dict[str, Any]], out_dir: Path, *, compare: dict[str, list[dict[str, Any]]] | None = None,
             lengths: Sequence[int] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    train = [r for r in rows if r["step"] > 0 and "critic/score/mean" in r]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "critic/score/mean"), marker="o", label="reward (critic/score/mean)")
    _plot_accuracy(ax, rows)
    ax.set_xlabel("RL step"), ax.set_title("Reward and validation accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    _save(fig, out_dir / "reward_and_val_acc.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "rollout/spec_accept_length"), marker="o", color="k", label="mean accepted length")
    depth_keys = sorted({k for r in train for k in r if k.startswith("rollout/spec_accept_rate_")})
    ax2 = ax.twinx()
    for key in depth_keys:
        ax2.plot(*_series(train, key), linestyle="--", label=f"acceptance depth {key.rsplit('_', 1)[-1]}")
    ax.set_xlabel("RL step"), ax.set_ylabel("tokens per trunk forward"), ax2.set_ylabel("acceptance rate")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower left", fontsize=8), ax.grid(alpha=0.3)
    ax.set_title("Speculative decoding with the MTP layers during RL")
    _save(fig, out_dir / "accept_length.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(train, "rollout/mean_draft_depth"), marker="o", label="chosen draft depth (mean per decode step)")
    ax.plot(*_series(train, "rollout/spec_accept_length"), marker=".", color="k", linestyle=":",
            label="tokens per trunk forward")
    ax.set_xlabel("RL step"), ax.set_ylim(bottom=0), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title("Draft depth chosen by the rollout (0 = plain decoding)")
    _save(fig, out_dir / "draft_depth.png", paths)

    fig, axes = plt.subplots(1, 2 if lengths else 1, figsize=(11 if lengths else 7, 4), squeeze=False)
    ax = axes[0][0]
    steps, mean = _series(train, "response_length/mean")
    ax.plot(steps, mean, marker="o", label="mean")
    lo, hi = _series(train, "response_length/min")[1], _series(train, "response_length/max")[1]
    if len(lo) == len(hi) == len(steps):
        ax.fill_between(steps, lo, hi, alpha=0.2, label="min - max")
    ax.set_xlabel("RL step"), ax.set_ylabel("tokens"), ax.set_title("Response length of the RL samples")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    if lengths:
        ax = axes[0][1]
        ax.hist(list(lengths), bins=30)
        ax.set_xlabel("response tokens"), ax.set_ylabel("responses")
        ax.set_title(f"Response lengths, final policy ({len(lengths)} samples)")
    _save(fig, out_dir / "response_length.png", paths)

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(train)
    steps = [r["step"] for r in train]
    for phase in PHASES:
        vals = [r.get(f"timing_s/{phase}", 0.0) or 0.0 for r in train]
        if any(vals):
            ax.bar(steps, vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("RL step"), ax.set_ylabel("seconds"), ax.set_title("Time per phase"), ax.legend(fontsize=8)
    _save(fig, out_dir / "time_per_phase.png", paths)

    if compare:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, crow in compare.items():
            ax.plot(*_series([r for r in crow if r["step"] > 0], "rollout/spec_accept_length"), marker="o", label=name)
        ax.set_xlabel("RL step"), ax.set_ylabel("mean accepted length"), ax.grid(alpha=0.3), ax.legend()
        ax.set_title("Accepted length: MTP layers trained during RL vs frozen")
        _save(fig, out_dir / "ablation_accept_length.png", paths)
        fig, ax = plt.subplots(figsize=(7, 4))
        for (name, crow), marker in zip(compare.items(), "so^v"):
            _plot_accuracy(ax, crow, label=f"{name}: ", marker=marker)
        ax.set_xlabel("RL step"), ax.set_ylabel("accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        ax.set_title("Validation accuracy: MTP layers trained during RL vs frozen")
        _save(fig, out_dir / "ablation_val_acc.png", paths)
    return paths


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of a run: validation accuracy before/after (val_kwargs and greedy), reward, length, acceptance,
    chosen draft depth, phase times."""
    train = [r for r in rows if r["step"] > 0 and "critic/score/mean" in r]
    vals, greedy = _val_points(rows, _val_acc), _val_points(rows, _val_acc_greedy)
    accept = [r["rollout/spec_accept_length"] for r in train if r.get("rollout/spec_accept_length") is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out: dict[str, Any] = {
        "num_steps": len(train),
        "val_acc_before": vals[0][1] if vals and vals[0][0] == 0 else None,
        "val_acc_after": vals[-1][1] if vals else None,
        "val_acc_greedy_before": greedy[0][1] if greedy and greedy[0][0] == 0 else None,
        "val_acc_greedy_after": greedy[-1][1] if greedy else None,
        "reward_first": train[0]["critic/score/mean"] if train else None,
        "reward_last": train[-1]["critic/score/mean"] if train else None,
        "response_length_mean": mean([r["response_length/mean"] for r in train]),
        "min_accept_length": min(accept) if accept else None,
        "mean_accept_length": mean(accept),
        "mean_draft_depth": mean([r["rollout/mean_draft_depth"] for r in train if r.get("rollout/mean_draft_depth") is not None]),
        "rollout_tokens_per_s": mean([r.get("rollout/tokens_per_s") for r in train if r.get("rollout/tokens_per_s")]),
        # a row logged on resume from its checkpoint (killed between the save and the log) has no step time
        "step_seconds_mean": mean([r["timing_s/step"] for r in train if r.get("timing_s/step") is not None]),
    }
    depth_keys = sorted({k for r in train for k in r if k.startswith("rollout/spec_accept_rate_")})
    out["accept_rate_per_depth_mean"] = {k.rsplit("_", 1)[-1]: mean([r[k] for r in train if r.get(k) is not None])
                                         for k in depth_keys}
    out["phase_seconds_mean"] = {p: mean([r.get(f"timing_s/{p}", 0.0) or 0.0 for r in train]) for p in PHASES}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_report(run_dir: str | Path, extra: Mapping[str, Any] | None = None,
                 compare: dict[str, list[dict[str, Any]]] | None = None,
                 lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``plots/*.png`` and ``summary.json`` into ``run_dir``; returns the summary.
    ``lengths``: response lengths to plot as a distribution (the summary gets their quantiles)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = {**summarize(rows), **(extra or {})}
    for name, other in (compare or {}).items():
        theirs = summarize(other)
        for key in ("mean_accept_length", "min_accept_length", "val_acc_before", "val_acc_after",
                    "val_acc_greedy_after"):
            summary[f"{key}[{name}]"] = theirs[key]
    if lengths:
        ordered = sorted(lengths)
        summary["response_length_quantiles"] = {f"p{q}": ordered[min(len(ordered) - 1, len(ordered) * q // 100)]
                                                for q in (10, 50, 90, 99)} | {"max": ordered[-1]}
    plots = plot_run(rows, run_dir / "plots", compare=compare, lengths=lengths)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# mtprl run report", "", "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict):
            lines += [f"| {k}.{kk} | {_fmt(vv)} |" for kk, vv in v.items()]
        else:
            lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", *[f"![{p.stem}](plots/{p.name})" for p in plots], ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary
