"""The demo's results: rows from held-out answers, one table (printed and ``results.md``), a PNG
and ``report.json`` in the output folder.

Rows (``report.json["rows"]``): one per variant, seed, question kind and image-size bucket (and
``"all"`` buckets): ``{variant, kind, size_bucket, accuracy, n, visual_tokens_mean,
local_kept_fraction, seed}``. Accuracy is the fraction of held-out questions whose first answer
token is right; ``visual_tokens_mean`` is the mean number of visual tokens an image gives the LLM;
``local_kept_fraction`` the router's kept share of the local tokens (``None`` without tiles). The
table shows the mean over seeds and, with more than one seed, ± half the range.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from slime_adapters.config import atomic_write_text

__all__ = ["summarise", "table", "write_outputs"]

BUCKETS = ("<=336", "<=1000", ">1000", "all")
KINDS = ("detail", "global")


def summarise(results: list[dict], *, variant: str, seed: int) -> list[dict]:
    """Rows of one evaluated variant (see the module docstring)."""
    rows = []
    for kind in KINDS:
        for bucket in BUCKETS:
            sel = [r for r in results if r["kind"] == kind
                   and (bucket == "all" or r["size_bucket"] == bucket)]
            if not sel:
                continue
            local = sum(r["local"] for r in sel)
            rows.append({
                "variant": variant, "kind": kind, "size_bucket": bucket,
                "accuracy": sum(r["correct"] for r in sel) / len(sel), "n": len(sel),
                "visual_tokens_mean": mean(r["visual_tokens"] for r in sel),
                "local_kept_fraction": sum(r["kept"] for r in sel) / local if local else None,
                "seed": seed})
    return rows


def _cell(values: list[float], scale: float = 100.0, digits: int = 0) -> str:
    m = mean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(max(values) - min(values)) * scale / 2:.{digits}f}"


def _values(rows, variant, kind, bucket, key):
    return [r[key] for r in rows if r["variant"] == variant and r["kind"] == kind
            and r["size_bucket"] == bucket and r[key] is not None]


def table(report: dict) -> str:
    """The markdown table: accuracy (%) per kind and bucket, tokens per image, kept share."""
    rows, variants = report["rows"], report["variants"]
    head = (["variant"] + [f"{k} {b}" for k in KINDS for b in BUCKETS]
            + ["visual tokens / image", "local kept"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [v]
        for k in KINDS:
            for b in BUCKETS:
                vals = _values(rows, v, k, b, "accuracy")
                cells.append(_cell(vals) if vals else "–")
        toks = _values(rows, v, "detail", "all", "visual_tokens_mean")
        kept = _values(rows, v, "detail", "all", "local_kept_fraction")
        cells += [_cell(toks, 1.0) if toks else "–", _cell(kept, 100.0) + "%" if kept else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    n = {(k, b): _values(rows, variants[0], k, b, "n") for k in KINDS for b in BUCKETS}
    counts = ", ".join(f"{k} {b}: {n[(k, b)][0]}" for k in KINDS for b in BUCKETS if n[(k, b)])
    chance = ", ".join(f"{k} {100 * c:.0f}%" for k, c in report["chance"].items())
    return "\n".join(lines) + (f"\n\nAccuracy in % on held-out test questions (n per cell: "
                               f"{counts}); chance: {chance}.")


def notes(report: dict) -> list[str]:
    """What the table says about the targets, computed from its rows."""
    rows = report["rows"]

    def acc(v, k):
        vals = _values(rows, v, k, "all", "accuracy")
        return 100 * mean(vals) if vals else None

    out = []
    g_d, s_d, g_g, s_g = (acc("global-only", "detail"), acc("slime", "detail"),
                          acc("global-only", "global"), acc("slime", "global"))
    if None not in (g_d, s_d, g_g, s_g):
        out.append(f"slime vs global-only on detail questions: {s_d - g_d:+.0f} points "
                   f"({s_d:.0f}% vs {g_d:.0f}%; target >= +20); on global questions "
                   f"{s_g - g_g:+.0f} points (target within 5).")
    kept = _values(rows, "slime", "detail", "all", "local_kept_fraction")
    a_d = acc("slime-all-local", "detail")
    if kept and a_d is not None:
        verdict = "helped" if s_d > a_d + 2 else "hurt" if s_d < a_d - 2 else "held"
        out.append(f"the router keeps {100 * mean(kept):.0f}% of the local tokens; against every "
                   f"local token (gamma = 1) fewer tokens {verdict} detail accuracy "
                   f"({s_d:.0f}% vs {a_d:.0f}%).")
    j_d = acc("slime-joint", "detail")
    if j_d is not None:
        j_g = acc("slime-joint", "global")
        gap = ((s_d + s_g) - (j_d + j_g)) / 2
        verdict = ("a tie" if abs(gap) < 0.5 else
                   f"{'alternating (slime)' if gap > 0 else 'joint (slime-joint)'} wins by "
                   f"{abs(gap):.0f} points on average")
        out.append(f"alternating vs joint training: detail {s_d:.0f}% vs {j_d:.0f}%, global "
                   f"{s_g:.0f}% vs {j_g:.0f}%; {verdict}.")
    bad = [f"{s.get('variant') or 'encoder'} {s['stage']}" for s in report["stages"]
           if s.get("loss_fell") is False]
    if bad:
        out.append("the loss did not fall in: " + ", ".join(bad))
    return out


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, variants = report["rows"], report["variants"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(KINDS)
    for i, kind in enumerate(KINDS):
        means = [100 * mean(_values(rows, v, kind, "all", "accuracy") or [0]) for v in variants]
        ax1.bar([x + i * width for x in range(len(variants))], means, width, label=kind)
        ax1.axhline(100 * report["chance"][kind], ls=":", lw=1, color=f"C{i}")
    ax1.set_xticks([x + width / 2 for x in range(len(variants))], variants, rotation=15)
    ax1.set_ylabel("held-out accuracy (%)  (dotted: chance)")
    ax1.set_ylim(0, 100)
    ax1.legend(title="question kind")
    toks = [mean(_values(rows, v, "detail", "all", "visual_tokens_mean") or [0])
            for v in variants]
    ax2.bar(range(len(variants)), toks, color="C2")
    ax2.set_xticks(range(len(variants)), variants, rotation=15)
    ax2.set_ylabel("visual tokens per image (mean)")
    fig.suptitle(f"SliME demo, {report['args']['seeds']} seed(s), commit {report['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> None:
    """Print the table and the notes; write ``results.md``, ``results.png``, ``report.json``."""
    report["notes"] = notes(report)
    text = table(report)
    print("\n" + text + "\n")
    for line in report["notes"]:
        print("- " + line)
    out.mkdir(parents=True, exist_ok=True)
    md = (f"# SliME demo results\n\n{text}\n\n" + "".join(f"- {n}\n" for n in report["notes"])
          + f"\n{report['seconds']:.0f} s in all, commit {report['commit']}.\n")
    atomic_write_text(out / "results.md", md)
    _plot(report, out / "results.png")
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.png'} and {out / 'report.json'} "
          f"({report['seconds']:.0f} s in all)")
