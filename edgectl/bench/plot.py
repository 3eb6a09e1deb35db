"""Timeline picture of one bench run: a Gantt chart of the spans the runtime traced.

One panel per bench row (the row's last run), one horizontal lane per trace lane ("load",
"compute", and with shard sets "loader" and whatever else the runtime records; a draft row's
"verify" and "draft" lanes are coloured by lane, a bar per target call and per draft step),
one bar per span. Consecutive decode steps alternate in shade so single steps stay visible. The warm-up
and measured generations are marked as bands. matplotlib is imported here only, lazily.
"""

from __future__ import annotations

from pathlib import Path

LANE_ORDER = ("read", "loader", "load", "compute", "verify", "draft")
COLORS = {
    "load_program": "#4c72b0",
    "load_method": "#55a868",
    "prefill": "#c44e52",
    "decode": ("#dd8452", "#f2b880"),  # alternate shades: one bar per step
}
OTHER = ("#8172b3", "#b3a7d9")
LANE_COLORS = {  # speculative decoding (bench --draft): whatever the spans are named
    "verify": ("verify (a bar per target call)", ("#2a9d8f", "#8fd3c9")),
    "draft": ("draft (a bar per draft call or load)", ("#937860", "#c9b29b")),
}


def _lanes(spans: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(s["lane"] for s in spans))
    return sorted(seen, key=lambda ln: (LANE_ORDER.index(ln) if ln in LANE_ORDER else len(LANE_ORDER), seen.index(ln)))


def plot_timeline(rows: list[dict], out: str | Path) -> Path:
    """Draw the last run with a trace of each report row (`BenchReport.to_dict()["rows"]`) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out = Path(out)
    # rows whose runs all failed (OOM-killed, no plan within the budget) have nothing to draw
    picked = [(r, [x for x in r["runs"] if "trace" in x][-1]) for r in rows if any("trace" in x for x in r["runs"])]
    if not picked:
        raise ValueError("no run with a trace to draw")
    n = len(picked)
    fig, axes = plt.subplots(n, 1, figsize=(12, 1.2 + 1.6 * n), squeeze=False)
    used: dict[str, str] = {}
    for ax, (row, run) in zip(axes[:, 0], picked):
        spans = run["trace"]
        lanes = _lanes(spans)
        y = {ln: i for i, ln in enumerate(reversed(lanes))}
        parity: dict[str, int] = {}
        for s in spans:
            by_lane = s["lane"] in LANE_COLORS
            named = s["name"] in COLORS and not by_lane
            c = LANE_COLORS[s["lane"]][1] if by_lane else COLORS[s["name"]] if named else OTHER
            if isinstance(c, tuple):  # alternate shades: per name (decode steps), else per lane
                key = s["name"] if named else ("lane", s["lane"])
                k = parity.get(key, 0)
                parity[key] = k + 1
                c = c[k % 2]
            # shard sets trace one span per shard, file and setup step: one legend entry for all
            if by_lane:
                used.setdefault(LANE_COLORS[s["lane"]][0], LANE_COLORS[s["lane"]][1][0])
            else:
                used.setdefault(s["name"] if named else "shards, files, setup (a bar each)", c if named else OTHER[0])
            ax.broken_barh([(s["start"] * 1e3, max((s["end"] - s["start"]) * 1e3, 1e-3))], (y[s["lane"]] - 0.35, 0.7), facecolors=c, linewidth=0)
        for name, (a, b) in run.get("phases", {}).items():
            ax.axvspan(a * 1e3, b * 1e3, color="#999999" if name == "warmup" else "#4c72b0", alpha=0.08, linewidth=0)
            ax.text((a + b) / 2 * 1e3, len(lanes) - 0.45, "warm-up generation" if name == "warmup" else "measured generation",
                    ha="center", va="bottom", fontsize=8, color="#555555")
        ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
        ax.set_ylim(-0.6, len(lanes) - 0.1 + 0.35)
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(
            f"{row['label']}: load {run['load_ms']:.0f} ms, TTFT {run['ttft_ms']:.0f} ms, "
            f"prefill {run['prefill_tok_s']:.0f} tok/s ({run['prompt_tokens']} tok), "
            f"decode {run['decode_tok_s']:.1f} tok/s ({run['new_tokens']} tok)",
            fontsize=9, loc="left",
        )
    axes[-1, 0].set_xlabel("time since the artifact started loading (ms)")
    fig.legend(handles=[Patch(color=c, label="decode (a bar per step)" if n == "decode" else n) for n, c in used.items()], loc="upper right", ncol=len(used), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
