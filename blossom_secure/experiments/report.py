"""From per-cell results to the study's tables, raw files and plots.

Everything here reads the cell result documents written by
:func:`blossom_secure.experiments.runner.run_grid` and nothing else, so every number in
the report can be traced to a cell file.

Relative gain, as BLOSSOM reports it: ``(m_scheme - m_full) / m_full * 100`` on the
site-averaged final metric (accuracy or macro-F1 on every site's own held-out split,
averaged over sites), with both metrics first averaged over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from blossom_secure._fs import atomic_write

__all__ = ["METRICS", "PAIRS", "paired_comparisons", "paired_interval", "parameter_checks", "relative_gain",
           "secure_vs_plaintext", "summarise", "write_report"]

METRICS = ("accuracy", "macro_f1")
_SETTING = ("dataset", "tasks", "split", "partition", "scheme", "dp", "aggregation")
_SCHEME_ORDER = ("paper-full-model", "full-model", "private-head", "private-head-fusion", "local", "local-nodp")
_COLOURS = {"paper-full-model": "#000000", "full-model": "#6d6d6d", "private-head": "#1565c0",
            "private-head-fusion": "#2e7d32", "local": "#c62828", "local-nodp": "#ef6c00"}


def relative_gain(metric: float, baseline: float) -> float:
    """``(metric - baseline) / baseline * 100`` (percent); NaN when ``baseline`` is 0.

    Example:
        >>> round(relative_gain(0.69, 0.60), 9)
        15.0
    """
    if baseline == 0:
        return math.nan
    return (metric - baseline) / baseline * 100.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(results: Iterable[Mapping]) -> list[dict]:
    """One row per setting (every cell field but the seed): mean and sample standard
    deviation over seeds of the final site-averaged metrics, and the mean curve."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for r in results:
        groups[tuple(r["cell"][k] for k in _SETTING)].append(r)
    rows = []
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["cell"]["seed"])
        row = dict(zip(_SETTING, key, strict=True))
        row["seeds"] = [r["cell"]["seed"] for r in rs]
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([r["final"][m] for r in rs])
            row[f"{m}_by_seed"] = [r["final"][m] for r in rs]
        rounds = min(len(r["curve"]) for r in rs)
        row["curve"] = {m: [float(np.mean([r["curve"][i][m] for r in rs])) for i in range(rounds)] for m in METRICS}
        eps = [r["epsilon_max"] for r in rs if r["epsilon_max"] is not None]
        row["epsilon_max"] = max(eps) if eps else None
        row["declined_site_rounds"] = int(sum(r["declined_site_rounds"] for r in rs))
        rows.append(row)
    return rows


def gains(rows: Sequence[Mapping]) -> list[dict]:
    """Relative gain of every scheme over full-model in the same setting (seed means)."""
    by = {tuple(r[k] for k in _SETTING): r for r in rows}
    out = []
    for r in rows:
        if r["scheme"] == "full-model" or r["aggregation"] == "plaintext":
            continue
        base = by.get((r["dataset"], r["tasks"], r["split"], r["partition"], "full-model", r["dp"], "in-memory"))
        if base is None:
            continue
        g = {k: r[k] for k in _SETTING}
        common = sorted(set(r["seeds"]) & set(base["seeds"]))
        for m in METRICS:
            g[f"{m}_gain_pct"] = relative_gain(r[f"{m}_mean"], base[f"{m}_mean"])
            per_seed = [relative_gain(r[f"{m}_by_seed"][r["seeds"].index(s)],
                                      base[f"{m}_by_seed"][base["seeds"].index(s)]) for s in common]
            spread = _mean_std(per_seed) if per_seed else (math.nan, math.nan)
            g[f"{m}_gain_pct_seed_mean"], g[f"{m}_gain_pct_seed_std"] = spread
        out.append(g)
    return out


#: The comparisons a hospital weighs: each block-wise scheme against the paper's baseline,
#: the holders-only ablation, and training alone with and without DP.
PAIRS = tuple((scheme, baseline) for scheme in ("private-head", "private-head-fusion")
              for baseline in ("paper-full-model", "full-model", "local", "local-nodp"))
_PAIRED_BY = ("dataset", "tasks", "split", "partition", "dp")


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired per-seed differences and its two-sided ``confidence`` interval from
    Student's t distribution with ``n - 1`` degrees of freedom; the interval is NaN with
    fewer than two pairs.

    Example:
        >>> mean, low, high = paired_interval([0.02, 0.04, 0.03])
        >>> round(mean, 4), round(low, 4), round(high, 4)
        (0.03, 0.0052, 0.0548)
    """
    from scipy import stats

    arr = np.asarray(differences, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return mean, mean - half, mean + half


def paired_comparisons(results: Iterable[Mapping], pairs: Sequence[tuple[str, str]] = PAIRS) -> list[dict]:
    """For every setting (data set, tasks, split, partition, DP) and every pair (scheme,
    baseline) run there on common seeds: the per-seed differences scheme - baseline of the
    final site-averaged metrics, their mean and 95% interval, and the verdict: ``win``
    when the interval lies above 0, ``loss`` below, ``tie`` otherwise (``n/a`` with fewer
    than two seeds). Only the secure or in-memory cells count (no plaintext twins)."""
    by: dict[tuple, dict[int, Mapping]] = defaultdict(dict)
    for r in results:
        c = r["cell"]
        if c["aggregation"] == "plaintext":
            continue
        by[(*(c[k] for k in _PAIRED_BY), c["scheme"])][c["seed"]] = r
    out = []
    for setting in sorted({key[:-1] for key in by}):
        for scheme, baseline in pairs:
            a, b = by.get((*setting, scheme)), by.get((*setting, baseline))
            if not a or not b:
                continue
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            row = {**dict(zip(_PAIRED_BY, setting, strict=True)), "scheme": scheme, "baseline": baseline,
                   "seeds": seeds}
            for m in METRICS:
                diffs = [a[s]["final"][m] - b[s]["final"][m] for s in seeds]
                mean, low, high = paired_interval(diffs)
                verdict = "n/a" if math.isnan(low) else "win" if low > 0 else "loss" if high < 0 else "tie"
                row.update({f"{m}_diff_by_seed": diffs, f"{m}_diff_mean": mean, f"{m}_ci95_low": low,
                            f"{m}_ci95_high": high, f"{m}_verdict": verdict})
            out.append(row)
    return out


def parameter_checks(results: Iterable[Mapping]) -> list[dict]:
    """Per secure block-wise setting: the largest difference, over seeds, rounds and blocks,
    between the securely aggregated mean update and the exact mean of the same clipped
    updates, against secure aggregation's bound (half a quantisation step)."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for r in results:
        check = r.get("secure_vs_plaintext_parameters")
        if check:
            groups[tuple(r["cell"][k] for k in _SETTING)].append(check)
    out = []
    for key, checks in sorted(groups.items()):
        diffs = [c["max_abs_diff"] for c in checks if c["max_abs_diff"] is not None]
        worst = max(diffs) if diffs else None
        bound = max(c["bound"] for c in checks)
        out.append({**dict(zip(_SETTING, key, strict=True)), "cells": len(checks),
                    "rounds_checked": int(sum(c["rounds_checked"] for c in checks)), "max_abs_diff": worst,
                    "bound": bound, "within_bound": worst is None or worst <= bound + 1e-6})
    return out


def secure_vs_plaintext(results: Iterable[Mapping]) -> list[dict]:
    """For every plaintext cell, its secure twin (same seed): final metric differences."""
    results = list(results)
    by_key = {r["key"]: r for r in results}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        if r["cell"]["aggregation"] != "plaintext":
            continue
        twin = by_key.get(r["key"].rsplit("_", 1)[0] + "_secure")
        if twin is None:
            continue
        key = tuple(r["cell"][k] for k in ("dataset", "tasks", "split", "partition", "scheme", "dp"))
        groups[key].append({"seed": r["cell"]["seed"],
                            **{f"{m}_secure": twin["final"][m] for m in METRICS},
                            **{f"{m}_plaintext": r["final"][m] for m in METRICS}})
    out = []
    for key, pairs in sorted(groups.items()):
        row = dict(zip(("dataset", "tasks", "split", "partition", "scheme", "dp"), key, strict=True))
        row["seeds"] = [p["seed"] for p in pairs]
        for m in METRICS:
            diffs = [p[f"{m}_secure"] - p[f"{m}_plaintext"] for p in pairs]
            row[f"{m}_diff_mean"], row[f"{m}_diff_std"] = _mean_std(diffs)
            row[f"{m}_diff_max_abs"] = float(np.max(np.abs(diffs)))
            row[f"{m}_secure_mean"] = float(np.mean([p[f"{m}_secure"] for p in pairs]))
            row[f"{m}_plaintext_mean"] = float(np.mean([p[f"{m}_plaintext"] for p in pairs]))
        out.append(row)
    return out


def headline(gain_rows: Sequence[Mapping]) -> list[dict]:
    """private-head (and private-head-fusion) over full-model, single-task settings, per
    data set, split and DP setting, averaged over the partitions; and over data sets."""
    acc: dict[tuple, list[Mapping]] = defaultdict(list)
    for g in gain_rows:
        if g["tasks"] != "single" or g["scheme"] not in ("private-head", "private-head-fusion"):
            continue
        acc[(g["scheme"], g["dataset"], g["split"], g["dp"])].append(g)
        acc[(g["scheme"], "all data sets", g["split"], g["dp"])].append(g)
    out = []
    for (scheme, dataset, split, dp), gs in sorted(acc.items()):
        out.append({"scheme": scheme, "dataset": dataset, "split": split, "dp": dp,
                    "settings_averaged": [f"{g['dataset']}/{g['partition']}" for g in gs],
                    **{f"{m}_gain_pct": float(np.mean([g[f"{m}_gain_pct"] for g in gs])) for m in METRICS}})
    return out


# ------------------------------------------------------------------------------------------
# Files


def _rounded(value):
    """A copy of a JSON-like value with every float rounded to 6 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _csv_bytes(rows: Sequence[Mapping], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c])
                    for c in columns])
    return buf.getvalue().encode("utf-8")


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:+.1f}%"


def _parameter_checks_md(checks: Sequence[Mapping]) -> str:
    """The parameter-level secure-vs-plaintext check as a table."""
    if not checks:
        return ""
    lines = ["### Secure aggregation vs exact means, on the parameters", "",
             "Largest difference, over seeds, rounds and blocks, between the securely aggregated mean update "
             "and the exact weighted mean of the same clipped updates; secure aggregation's bound is half a "
             "quantisation step.", "",
             "| data set | tasks | split | partition | scheme | DP | cells | rounds | max abs difference | bound "
             "| within |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        worst = "n/a" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.3g}"
        lines.append(f"| {c['dataset']} | {c['tasks']} | {c['split']} | {c['partition']} | {c['scheme']} | "
                     f"{c['dp']} | {c['cells']} | {c['rounds_checked']} | {worst} | {c['bound']:.3g} | "
                     f"{'yes' if c['within_bound'] else 'NO'} |")
    return "\n".join(lines + [""]) + "\n"


def _paired_md(paired: Sequence[Mapping]) -> str:
    """The paired comparisons as a table: accuracy difference, 95% interval, verdict."""
    if not paired:
        return ""
    lines = ["### Paired comparisons (per-seed differences, 95% interval; win = interval above 0)", "",
             "| data set | tasks | split | partition | DP | scheme | baseline | seeds | Δ accuracy [95% CI] | verdict "
             "| Δ macro-F1 [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in paired:
        cells = []
        for m in METRICS:
            interval = "" if math.isnan(p[f"{m}_ci95_low"]) else \
                f" [{p[f'{m}_ci95_low']:+.3f}, {p[f'{m}_ci95_high']:+.3f}]"
            cells += [f"{p[f'{m}_diff_mean']:+.3f}{interval}", p[f"{m}_verdict"]]
        lines.append(f"| {p['dataset']} | {p['tasks']} | {p['split']} | {p['partition']} | {p['dp']} | "
                     f"{p['scheme']} | {p['baseline']} | {len(p['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""]) + "\n"


def _tables_md(rows: Sequence[Mapping], gain_rows: Sequence[Mapping], twins: Sequence[Mapping],
               heads: Sequence[Mapping]) -> str:
    lines = ["<!-- Generated by `blossom experiment` from cells.csv; do not edit by hand. -->", ""]
    lines += ["### Headline: private-head over full-model (relative gain of site-averaged final metric)", "",
              "Averaged over the label partitions (IID and Dirichlet). The complete split, where no modality is "
              "missing, is the control.", "",
              "| data set | split | DP | accuracy gain | macro-F1 gain | averaged over |",
              "|---|---|---|---|---|---|"]
    order = {"incomplete": 0, "exclusive": 1, "complete": 2}
    for h in sorted(heads, key=lambda h: (h["dataset"] != "all data sets", h["dataset"], order.get(h["split"], 9),
                                          h["dp"])):
        if h["scheme"] == "private-head":
            lines.append(f"| {h['dataset']} | {h['split']} | {h['dp']} | {_pct(h['accuracy_gain_pct'])} | "
                         f"{_pct(h['macro_f1_gain_pct'])} | {', '.join(h['settings_averaged'])} |")
    lines.append("")
    lines += ["### The same gains per label partition (not averaged)", "",
              "| data set | split | partition | DP off: accuracy | DP off: macro-F1 | DP on: accuracy "
              "| DP on: macro-F1 |",
              "|---|---|---|---|---|---|---|"]
    by_setting = {(g["dataset"], g["split"], g["partition"], g["dp"]): g for g in gain_rows
                  if g["tasks"] == "single" and g["scheme"] == "private-head"}
    for dataset, split, partition in sorted({k[:3] for k in by_setting},
                                            key=lambda k: (k[0], order.get(k[1], 9), k[2])):
        off = by_setting.get((dataset, split, partition, "off"))
        on = by_setting.get((dataset, split, partition, "on"))
        cells = [_pct(g[f"{m}_gain_pct"]) if g else "" for g in (off, on) for m in METRICS]
        lines.append(f"| {dataset} | {split} | {partition} | " + " | ".join(cells) + " |")
    lines.append("")
    gain_by = {tuple(g[k] for k in _SETTING): g for g in gain_rows}
    settings = sorted({(r["dataset"], r["tasks"]) for r in rows},
                      key=lambda t: (t[1] != "single", ["synthetic", "breast_cancer", "digits"].index(t[0])
                                     if t[0] in ("synthetic", "breast_cancer", "digits") else 9))
    for dataset, tasks in settings:
        title = f"### {dataset}" + (" (task heterogeneity: sites alternate malignancy / severity)"
                                    if tasks == "hetero" else "")
        lines += [title, "", "Final site-averaged accuracy and macro-F1 (mean ± std over seeds); gain over full-model "
                  "in the same split, partition and DP setting.", "",
                  "| split | partition | DP | scheme | accuracy | gain | macro-F1 | gain |",
                  "|---|---|---|---|---|---|---|---|"]
        sel = [r for r in rows if r["dataset"] == dataset and r["tasks"] == tasks and r["aggregation"] != "plaintext"]
        sel.sort(key=lambda r: (["complete", "incomplete", "exclusive"].index(r["split"])
                                if r["split"] in ("complete", "incomplete", "exclusive") else 9,
                                r["partition"], r["dp"], _SCHEME_ORDER.index(r["scheme"])))
        for r in sel:
            g = gain_by.get(tuple(r[k] for k in _SETTING))
            lines.append(f"| {r['split']} | {r['partition']} | {r['dp']} | {r['scheme']} | "
                         f"{_fmt(r['accuracy_mean'], r['accuracy_std'])} | "
                         f"{_pct(g['accuracy_gain_pct']) if g else ''} | "
                         f"{_fmt(r['macro_f1_mean'], r['macro_f1_std'])} | "
                         f"{_pct(g['macro_f1_gain_pct']) if g else ''} |")
        lines.append("")
    if twins:
        lines += ["### Secure aggregation vs plaintext aggregation (same seeds)", "",
                  "Difference secure − plaintext in final site-averaged metric: mean ± std over seeds, and the largest "
                  "absolute difference.", "",
                  "| data set | split | partition | scheme | DP | accuracy (secure) | accuracy (plaintext) "
                  "| Δ accuracy | max abs Δ acc | Δ macro-F1 | max abs Δ F1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in twins:
            lines.append(f"| {t['dataset']} | {t['split']} | {t['partition']} | {t['scheme']} | {t['dp']} | "
                         f"{t['accuracy_secure_mean']:.4f} | {t['accuracy_plaintext_mean']:.4f} | "
                         f"{t['accuracy_diff_mean']:+.4f} ± {t['accuracy_diff_std']:.4f} | "
                         f"{t['accuracy_diff_max_abs']:.4f} | {t['macro_f1_diff_mean']:+.4f} ± "
                         f"{t['macro_f1_diff_std']:.4f} | {t['macro_f1_diff_max_abs']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def _plot_curves(rows: Sequence[Mapping], dataset: str, tasks: str, partition: str, metric: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["dataset"] == dataset and r["tasks"] == tasks and r["partition"] == partition
           and r["aggregation"] != "plaintext"]
    splits = [s for s in ("complete", "incomplete", "exclusive") if any(r["split"] == s for r in sel)]
    dps = [d for d in ("off", "on") if any(r["dp"] == d for r in sel)]
    if not splits or not dps:
        return None
    fig, axes = plt.subplots(len(dps), len(splits), figsize=(4.2 * len(splits), 3.2 * len(dps)), squeeze=False,
                             sharey=True)
    for i, dp in enumerate(dps):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            for scheme in _SCHEME_ORDER:
                for r in sel:
                    if r["split"] == split and r["dp"] == dp and r["scheme"] == scheme:
                        ys = r["curve"][metric]
                        ax.plot(range(1, len(ys) + 1), ys, label=scheme, color=_COLOURS[scheme])
            ax.set_title(f"{split}, DP {dp}", fontsize=10)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel(metric.replace("_", "-"))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{dataset}{' (task heterogeneity)' if tasks == 'hetero' else ''}, {partition}: "
                 f"site-averaged {metric.replace('_', '-')} vs round (mean over seeds)", fontsize=11)
    return _png(fig)


def _png(fig) -> bytes:
    """Lay out ``fig``, render it as PNG bytes, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_gains(gain_rows: Sequence[Mapping], tasks: str, metric: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [g for g in gain_rows if g["tasks"] == tasks and g["scheme"] in ("private-head", "private-head-fusion")]
    datasets = [d for d in ("synthetic", "breast_cancer", "digits") if any(g["dataset"] == d for g in sel)]
    partitions = [p for p in ("iid", "dirichlet") if any(g["partition"] == p for g in sel)]
    if not datasets:
        return None
    fig, axes = plt.subplots(len(partitions), len(datasets), figsize=(4.4 * len(datasets), 3.3 * len(partitions)),
                             squeeze=False)
    bars = [(s, d) for s in ("private-head", "private-head-fusion") for d in ("off", "on")]
    colours = {("private-head", "off"): "#90caf9", ("private-head", "on"): "#1565c0",
               ("private-head-fusion", "off"): "#a5d6a7", ("private-head-fusion", "on"): "#2e7d32"}
    for i, partition in enumerate(partitions):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            splits = [s for s in ("complete", "incomplete", "exclusive")
                      if any(g["split"] == s and g["dataset"] == dataset for g in sel)]
            width = 0.8 / len(bars)
            for k, (scheme, dp) in enumerate(bars):
                ys = []
                for s in splits:
                    match = [g for g in sel if g["dataset"] == dataset and g["partition"] == partition
                             and g["split"] == s and g["scheme"] == scheme and g["dp"] == dp]
                    ys.append(match[0][f"{metric}_gain_pct"] if match else np.nan)
                ax.bar(np.arange(len(splits)) + (k - (len(bars) - 1) / 2) * width, ys, width,
                       label=f"{scheme}, DP {dp}", color=colours[(scheme, dp)])
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(splits)), splits)
            ax.set_title(f"{dataset}, {partition}", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"gain over full-model, % ({metric.replace('_', '-')})")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Relative gain over full-model per modality split, DP off vs on "
                 f"({'task heterogeneity' if tasks == 'hetero' else 'one task'})", fontsize=11)
    return _png(fig)


def write_report(results: Sequence[Mapping], out_dir: Path, *, config_text: str, command: str,
                 runs: Sequence[Mapping]) -> dict:
    """Write ``cells.csv``, ``curves.csv``, ``cells.json``, ``summary.json``, ``tables.md``
    and the PNG plots into ``out_dir``. Returns the summary document."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = sorted(results, key=lambda r: r["key"])
    rows = summarise(results)
    gain_rows = gains(rows)
    twins = secure_vs_plaintext(results)
    heads = headline(gain_rows)
    paired = paired_comparisons(results)
    checks = parameter_checks(results)

    cell_rows = []
    curve_rows = []
    for r in results:
        c = r["cell"]
        eps = [s["epsilon"] for s in r["sites"].values() if s.get("epsilon") is not None]
        cell_rows.append({**c, "rounds": r["rounds"], "accuracy": r["final"]["accuracy"],
                          "macro_f1": r["final"]["macro_f1"], "epsilon_max": max(eps) if eps else None,
                          "declined_site_rounds": r["declined_site_rounds"],
                          "bytes_to_coordinator": r["bytes_to_coordinator"], "wall_s": r["wall_s"]})
        for point in r["curve"]:
            curve_rows.append({**c, **point})
    cols = ["dataset", "tasks", "split", "partition", "scheme", "dp", "seed", "aggregation"]
    atomic_write(out_dir / "cells.csv", _csv_bytes(cell_rows, cols + ["rounds", "accuracy", "macro_f1", "epsilon_max",
                                                                      "declined_site_rounds", "bytes_to_coordinator",
                                                                      "wall_s"]))
    atomic_write(out_dir / "curves.csv", _csv_bytes(curve_rows, cols + ["round", "accuracy", "macro_f1"]))
    # Metrics rounded to 6 significant digits: far below the seed-to-seed spread, and it
    # keeps the committed raw results small.
    atomic_write(out_dir / "cells.json",
                 json.dumps(_rounded(results), indent=None, separators=(",", ":")).encode() + b"\n")
    summary = {
        "command": command,
        "config": config_text,
        "runs": list(runs),
        "cells": len(results),
        "cell_wall_s_sum": float(sum(r["wall_s"] for r in results)),
        "epsilon_max_over_all_sites": max((r["epsilon_max"] for r in results if r["epsilon_max"] is not None),
                                          default=None),
        "declined_site_rounds": int(sum(r["declined_site_rounds"] for r in results)),
        "headline": heads,
        "settings": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        "gains": gain_rows,
        "paired": paired,
        "secure_vs_plaintext": twins,
        "secure_vs_plaintext_parameters": checks,
    }
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=True).encode() + b"\n")
    atomic_write(out_dir / "tables.md", (_tables_md(rows, gain_rows, twins, heads) + _paired_md(paired)
                                          + _parameter_checks_md(checks)).encode())
    plots = []
    for dataset, tasks in sorted({(r["dataset"], r["tasks"]) for r in rows}):
        for partition in sorted({r["partition"] for r in rows}):
            png = _plot_curves(rows, dataset, tasks, partition, "accuracy")
            if png is not None:
                name = f"curve_{dataset}{'_hetero' if tasks == 'hetero' else ''}_{partition}_accuracy.png"
                atomic_write(out_dir / name, png)
                plots.append(name)
    for tasks in sorted({g["tasks"] for g in gain_rows}):
        for metric in METRICS:
            png = _plot_gains(gain_rows, tasks, metric)
            if png is not None:
                name = f"gain_{'hetero' if tasks == 'hetero' else 'single'}_{metric}.png"
                atomic_write(out_dir / name, png)
                plots.append(name)
    summary["plots"] = plots
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=True).encode() + b"\n")
    return summary
