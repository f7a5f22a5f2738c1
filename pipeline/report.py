"""The run report: Markdown tables plus PNG plots (reject reasons, completion lengths)."""

from __future__ import annotations

import io
import posixpath
from collections import Counter
from typing import Any

from pipeline.card import cost_lines, prompt_lines

PLOTS = ("reasons.png", "lengths.png", "pass_rate.png")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(stats: dict[str, Any], tokens: dict[str, Counter[int]]) -> dict[str, bytes]:
    """PNG bytes by file name: reasons per domain (stacked bars) and completion token histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(stats["domains"])
    reasons = sorted({r for d in stats["domains"].values() for r in d["reasons"]} | {"accepted"})
    fig, ax = plt.subplots(figsize=(7, 3 + 0.3 * len(domains)))
    left = [0.0] * len(domains)
    for reason in reasons:
        values = [stats["domains"][d]["accepted"] if reason == "accepted" else stats["domains"][d]["reasons"].get(reason, 0)
                  for d in domains]
        ax.barh(domains, values, left=left, label=reason)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("samples")
    ax.set_title("Samples by outcome")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    out = {"reasons.png": _png(fig)}
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, histogram in tokens.items():
        if histogram:
            ax.hist(list(histogram), weights=list(histogram.values()), bins=40, alpha=0.6,
                    label=f"{label} (n={sum(histogram.values())})")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("samples")
    ax.set_title("Completion length: accepted vs rejected")
    ax.legend()
    out["lengths.png"] = _png(fig)
    plt.close(fig)

    histogram = stats.get("prompts", {}).get("pass_rate_histogram")
    if histogram:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(list(histogram), list(histogram.values()))
        ax.set_xlabel("pass rate (samples that passed / samples)")
        ax.set_ylabel("prompts")
        ax.set_title("Prompts by pass rate")
        ax.tick_params(axis="x", labelsize=7)
        out["pass_rate.png"] = _png(fig)
        plt.close(fig)
    return out


def markdown(manifest: dict[str, Any]) -> str:
    """The human-readable report; it embeds its version's plots."""
    stats = manifest["stats"]
    lines = [
        f"# Run report: {manifest.get('job', {}).get('name', '')}",
        "",
        f"- run `{manifest.get('run_id')}`, model `{manifest.get('model')}`, output `{manifest.get('output')}`",
        f"- samples {stats['samples']}, accepted {stats['accepted']} ({stats['accept_rate']:.1%})",
        f"- timings: {manifest.get('timings', {})}",
        *cost_lines(manifest.get("cost")),
        *prompt_lines(stats.get("prompts")),
        "",
        "| domain | samples | accepted | accept rate | prompts | prompts with ≥1 accepted |",
        "|---|---|---|---|---|---|",
    ]
    for dom, d in stats["domains"].items():
        share = d["prompts_with_accepted"] / d["prompts"] if d["prompts"] else 0.0
        lines.append(f"| {dom} | {d['samples']} | {d['accepted']} | {d['accept_rate']:.1%} | {d['prompts']} | "
                     f"{d['prompts_with_accepted']} ({share:.0%}) |")
    lines += _mix_steps(manifest.get("sources", []))
    lines += ["", "## Reject reasons", "", "| domain | reason | samples | share of domain |", "|---|---|---|---|"]
    for dom, d in stats["domains"].items():
        for reason, n in sorted(d["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {dom} | `{reason}` | {n} | {n / d['samples']:.1%} |")
    if manifest.get("cost"):
        lines += ["", "## Cost by domain", "", "| domain | samples | accepted | prompt tokens | completion tokens | "
                  "tokens per accepted |", "|---|---|---|---|---|---|"]
        for dom, c in manifest["cost"]["by_domain"].items():
            lines.append(f"| {dom} | {c['samples']} | {c['accepted']} | {c['prompt']} | {c['completion']} | "
                         f"{c['tokens_per_accepted']} |")
    histogram = stats.get("prompts", {}).get("pass_rate_histogram")
    if histogram:
        lines += ["", "## Prompts by pass rate", "", "| pass rate | prompts |", "|---|---|"]
        lines += [f"| {band} | {n} |" for band, n in histogram.items()]
    lines += ["", "## Completion tokens", "", "| | mean | p50 | p90 | max |", "|---|---|---|---|---|"]
    for label, q in stats["completion_tokens"].items():
        if q:
            lines.append(f"| {label} | {q['mean']} | {q['p50']} | {q['p90']} | {q['max']} |")
    lines += [""] + [f"![{posixpath.basename(p)[:-4]}]({p})\n" for p in manifest["files"].get("plots", [])]
    return "\n".join(lines)


def _mix_steps(sources: list[dict[str, Any]]) -> list[str]:
    """A mix's report: per source, the samples each step removed, in the order the steps ran."""
    if not sources:
        return []
    steps = list(sources[0]["removed"])
    lines = ["", "## Sources: samples removed by each step", "",
             "| source | read | " + " | ".join(steps) + " | requested | selected | prompts |",
             "|---|" + "---|" * (len(steps) + 4)]
    for s in sources:
        lines.append(f"| {s['name']} | {s['samples_read']} | " + " | ".join(str(s["removed"][k]) for k in steps)
                     + f" | {s['requested']} | {s['selected']} | {s['prompts_selected']}/{s['prompts_read']} |")
    return lines
