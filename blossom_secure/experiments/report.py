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

__all__ = ["ALL_METRICS", "GOAL_BASELINES", "METRICS", "PAIRS", "best_blockwise", "gains", "goal_table",
           "goal_verdict_counts", "paired_comparisons", "paired_interval", "parameter_checks", "privacy_utility",
           "relative_gain", "secure_vs_plaintext", "summarise", "write_report"]

METRICS = ("accuracy", "macro_f1")
#: The metrics every comparison is made on: the site averages, unweighted and weighted by
#: each site's held-out size.
ALL_METRICS = ("accuracy", "macro_f1", "accuracy_weighted", "macro_f1_weighted")
_SETTING = ("dataset", "tasks", "split", "partition", "scheme", "dp", "epsilon", "aggregation")
_SCHEME_ORDER = ("private-head", "private-head-fusion", "private-head-fedavgm", "paper-full-model", "fedavg-ft",
                 "full-model", "local", "local-nodp")
_COLOURS = {"paper-full-model": "#000000", "fedavg-ft": "#8e24aa", "full-model": "#6d6d6d",
            "private-head": "#1565c0", "private-head-fusion": "#2e7d32", "private-head-fedavgm": "#00838f",
            "local": "#c62828", "local-nodp": "#ef6c00", "best block-wise": "#1565c0"}
_BLOCKWISE = ("private-head", "private-head-fusion", "private-head-fedavgm")
#: The goal table's baselines, in its order.
GOAL_BASELINES = ("paper-full-model", "fedavg-ft", "local", "local-nodp")
_SPLIT_ORDER = ("complete", "incomplete", "exclusive")
_DATASET_ORDER = ("synthetic", "breast_cancer", "digits")


def _value(result: Mapping, metric: str) -> float:
    """A cell's final site-averaged ``metric`` (``*_weighted``: weighted by held-out size)."""
    if metric.endswith("_weighted"):
        return float(result["final_weighted_by_holdout"][metric[:-len("_weighted")]])
    return float(result["final"][metric])


def _epsilon_of(cell: Mapping):
    """The epsilon a cell is compared at: its target with DP, ``None`` without (a cell
    without DP is the same run at every epsilon)."""
    if cell["dp"] != "on" or cell["scheme"] == "local-nodp":
        return None
    return cell.get("epsilon", 8.0)


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


def _setting_key(cell: Mapping) -> tuple:
    return tuple(_epsilon_of(cell) if k == "epsilon" else cell[k] for k in _SETTING)


def summarise(results: Iterable[Mapping]) -> list[dict]:
    """One row per setting (every cell field but the seed and the hyperparameters): mean,
    sample standard deviation and 95% interval over seeds of the final site-averaged
    metrics, the hyperparameters used, the majority-class rate, and the mean curve with
    its per-round standard deviation."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for r in results:
        groups[_setting_key(r["cell"])].append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["cell"]["seed"])
        row = dict(zip(_SETTING, key, strict=True))
        row["seeds"] = [r["cell"]["seed"] for r in rs]
        row["learning_rate"] = sorted({r["cell"].get("learning_rate") for r in rs}, key=str)
        row["batch_size"] = sorted({r["cell"].get("batch_size") for r in rs}, key=str)
        for m in ALL_METRICS:
            values = [_value(r, m) for r in rs if m in METRICS or "final_weighted_by_holdout" in r]
            if not values:
                continue
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(values)
            _, row[f"{m}_ci95_low"], row[f"{m}_ci95_high"] = paired_interval(values)
            row[f"{m}_by_seed"] = values
        majority = [r.get("majority_class_accuracy") for r in rs]
        row["majority_class_accuracy"] = float(np.mean(majority)) if None not in majority else None
        rounds = min(len(r["curve"]) for r in rs)
        row["curve"] = {m: [float(np.mean([r["curve"][i][m] for r in rs])) for i in range(rounds)] for m in METRICS}
        row["curve_std"] = {m: [_mean_std([r["curve"][i][m] for r in rs])[1] for i in range(rounds)]
                            for m in METRICS}
        eps = [r["epsilon_max"] for r in rs if r["epsilon_max"] is not None]
        row["epsilon_max"] = max(eps) if eps else None
        row["declined_site_rounds"] = int(sum(r["declined_site_rounds"] for r in rs))
        rows.append(row)
    return rows


def gains(rows: Sequence[Mapping], baseline: str = "paper-full-model") -> list[dict]:
    """Relative gain (BLOSSOM's measure) of every scheme over ``baseline`` in the same
    setting and epsilon, on seed means; and the mean and spread of the per-seed gains."""
    by = {tuple(r[k] for k in _SETTING if k not in ("scheme", "aggregation")): r for r in rows
          if r["scheme"] == baseline}
    out = []
    for r in rows:
        if r["scheme"] == baseline or r["aggregation"] == "plaintext":
            continue
        base = by.get(tuple(r[k] for k in _SETTING if k not in ("scheme", "aggregation")))
        if base is None:
            continue
        g = {k: r[k] for k in _SETTING}
        g["baseline"] = baseline
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
#: FedAvg with fine-tuning, the holders-only ablation, and training alone with and without
#: DP; and the method ablations (server momentum, fine-tuning, a private fusion block).
PAIRS = (*((scheme, baseline) for scheme in _BLOCKWISE
           for baseline in ("paper-full-model", "fedavg-ft", "full-model", "local", "local-nodp")),
         ("private-head-fedavgm", "private-head"), ("fedavg-ft", "paper-full-model"),
         ("private-head-fusion", "private-head"), ("local", "local-nodp"))
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
    """For every setting (data set, tasks, split, partition, DP, epsilon) and every pair
    (scheme, baseline) run there on common seeds: the per-seed differences scheme -
    baseline of the final site-averaged metrics (unweighted and weighted by held-out size),
    their mean and 95% interval, and the verdict: ``win`` when the interval lies above 0,
    ``loss`` below, ``tie`` otherwise (``n/a`` with fewer than two seeds). A baseline
    without DP (``local-nodp``) is the same run at every epsilon. Only the secure or
    in-memory cells count (no plaintext twins)."""
    by: dict[tuple, dict[int, Mapping]] = defaultdict(dict)
    for r in results:
        c = r["cell"]
        if c["aggregation"] == "plaintext":
            continue
        by[(*(c[k] for k in _PAIRED_BY), _epsilon_of(c), c["scheme"])][c["seed"]] = r
    out = []
    settings = sorted({key[:-1] for key in by if key[-2] is not None}, key=str)
    for setting in settings:
        for scheme, baseline in pairs:
            a = by.get((*setting, scheme))
            b = by.get((*setting, baseline)) or by.get((*setting[:-1], None, baseline))
            if not a or not b:
                continue
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            row = {**dict(zip((*_PAIRED_BY, "epsilon"), setting, strict=True)), "scheme": scheme,
                   "baseline": baseline, "seeds": seeds}
            for m in ALL_METRICS:
                if m not in METRICS and not all("final_weighted_by_holdout" in x[s] for x in (a, b) for s in seeds):
                    continue
                diffs = [_value(a[s], m) - _value(b[s], m) for s in seeds]
                mean, low, high = paired_interval(diffs)
                row.update({f"{m}_diff_by_seed": diffs, f"{m}_diff_mean": mean, f"{m}_ci95_low": low,
                            f"{m}_ci95_high": high, f"{m}_verdict": _verdict(low, high)})
            out.append(row)
    return out


def _verdict(low: float, high: float) -> str:
    return "n/a" if math.isnan(low) else "win" if low > 0 else "loss" if high < 0 else "tie"


def best_blockwise(tuning: Mapping | None, dataset: str, tasks: str, epsilon: float,
                   candidates: Sequence[str]) -> str:
    """The block-wise scheme a researcher would deploy for ``dataset`` at ``epsilon``: the
    one of ``candidates`` with the best *validation* accuracy in the tuning (never chosen
    on the held-out results it is then compared on); the first candidate without tuning."""
    if not candidates:
        raise ValueError("no block-wise scheme to choose from")
    if not tuning:
        return candidates[0]
    scores = {}
    for choice in tuning["choices"]:
        if (choice["dataset"], choice["tasks"], choice["epsilon"]) == (dataset, tasks, epsilon) \
                and choice["scheme"] in candidates:
            scores[choice["scheme"]] = choice["validation_accuracy"]
    if not scores:
        return candidates[0]
    return max(candidates, key=lambda s: scores.get(s, -math.inf))


def goal_table(results: Sequence[Mapping], *, epsilon: float, tuning: Mapping | None) -> list[dict]:
    """The question a hospital asks, per data set x split x partition at ``epsilon``: does
    joining (the best block-wise scheme, chosen on validation) beat the paper-style
    full model, FedAvg with fine-tuning, and training alone with and without DP? Each row
    has every scheme's mean and 95% interval over seeds, the majority-class rate, and the
    paired difference of the best block-wise scheme against each baseline."""
    by: dict[tuple, dict[str, list[Mapping]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        c = r["cell"]
        if c["aggregation"] == "plaintext" or c["dp"] != "on" or c["tasks"] != "single":
            continue
        eps = _epsilon_of(c)
        if eps is not None and eps != epsilon:
            continue
        by[(c["dataset"], c["split"], c["partition"])][c["scheme"]].append(r)
    paired = {(p["dataset"], p["split"], p["partition"], p["scheme"], p["baseline"]): p
              for p in paired_comparisons(results) if p["epsilon"] == epsilon and p["tasks"] == "single"}
    rows = []
    for (dataset, split, partition), schemes in sorted(
            by.items(), key=lambda kv: (_order(_DATASET_ORDER, kv[0][0]), _order(_SPLIT_ORDER, kv[0][1]), kv[0][2])):
        candidates = [s for s in _BLOCKWISE if s in schemes and s != "private-head-fedavgm"] or \
            [s for s in _BLOCKWISE if s in schemes]
        if not candidates:
            continue
        best = best_blockwise(tuning, dataset, "single", epsilon, candidates)
        row = {"dataset": dataset, "split": split, "partition": partition, "epsilon": epsilon, "best_blockwise": best,
               "accuracy": {}}
        for name in (best, *GOAL_BASELINES):
            rs = schemes.get(name)
            if not rs:
                continue
            values = [_value(r, "accuracy") for r in rs]
            mean, low, high = paired_interval(values)
            label = "best_blockwise" if name == best else name
            row["accuracy"][label] = {"mean": mean, "ci95_low": low, "ci95_high": high, "seeds": len(values)}
        majority = [r.get("majority_class_accuracy") for rs in schemes.values() for r in rs]
        row["majority_class"] = float(np.mean(majority)) if majority and None not in majority else None
        for baseline in GOAL_BASELINES:
            p = paired.get((dataset, split, partition, best, baseline))
            if p is not None:
                row[f"vs_{baseline}"] = {m: {"diff_mean": p[f"{m}_diff_mean"], "ci95_low": p[f"{m}_ci95_low"],
                                             "ci95_high": p[f"{m}_ci95_high"], "verdict": p[f"{m}_verdict"]}
                                         for m in ALL_METRICS if f"{m}_diff_mean" in p}
        rows.append(row)
    return rows


def privacy_utility(rows: Sequence[Mapping]) -> list[dict]:
    """Per data set, split and partition of the privacy-utility curve: each scheme's final
    accuracy (mean, 95% interval) at every epsilon; the schemes without DP as references."""
    by: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["dp"] != "on" or r["tasks"] != "single" or r["aggregation"] == "plaintext":
            continue
        by[(r["dataset"], r["split"], r["partition"])][r["scheme"]][r["epsilon"]] = {
            "accuracy_mean": r["accuracy_mean"], "ci95_low": r["accuracy_ci95_low"],
            "ci95_high": r["accuracy_ci95_high"], "majority_class": r["majority_class_accuracy"]}
    out = []
    for (dataset, split, partition), schemes in sorted(by.items(), key=str):
        epsilons = sorted({e for s in schemes.values() for e in s if e is not None})
        if len(epsilons) < 2:
            continue
        out.append({"dataset": dataset, "split": split, "partition": partition, "epsilons": epsilons,
                    "schemes": {s: [{"epsilon": e, **v} for e, v in sorted(pts.items(), key=lambda kv: kv[0] or 0)]
                                for s, pts in schemes.items()}})
    return out


def _order(order: Sequence[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def parameter_checks(results: Iterable[Mapping]) -> list[dict]:
    """Per secure block-wise setting: the largest difference, over seeds, rounds and blocks,
    between the securely aggregated mean update and the exact mean of the same clipped
    updates, against secure aggregation's bound (half a quantisation step)."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for r in results:
        check = r.get("secure_vs_plaintext_parameters")
        if check:
            groups[_setting_key(r["cell"])].append(check)
    out = []
    for key, checks in sorted(groups.items(), key=lambda kv: str(kv[0])):
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
    lines = ["## Secure aggregation vs exact means, on the parameters", "",
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


def _ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    if math.isnan(low):
        return f"{mean:{f}}"
    return f"{mean:{f}} [{low:{f}}, {high:{f}}]"


def _paired_md(paired: Sequence[Mapping]) -> str:
    """The paired comparisons as a table: accuracy difference, 95% interval, verdict."""
    if not paired:
        return ""
    lines = ["## Every paired comparison", "",
             "Per-seed differences scheme − baseline of the final site-averaged metric, mean and 95% interval "
             "(Student t); win = interval above 0, loss = below, tie = contains 0. Weighted: sites weighted by "
             "their held-out size.", "",
             "| data set | split | partition | ε | scheme | baseline | seeds | Δ accuracy | verdict "
             "| Δ accuracy (weighted) | verdict | Δ macro-F1 | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(paired, key=lambda p: (p["tasks"], _order(_DATASET_ORDER, p["dataset"]),
                                           _order(_SPLIT_ORDER, p["split"]), p["partition"], -(p["epsilon"] or 0),
                                           _order(_SCHEME_ORDER, p["scheme"]), _order(_SCHEME_ORDER, p["baseline"]))):
        cells = []
        for m in ("accuracy", "accuracy_weighted", "macro_f1"):
            if f"{m}_diff_mean" in p:
                cells += [_ci(p[f"{m}_diff_mean"], p[f"{m}_ci95_low"], p[f"{m}_ci95_high"], True), p[f"{m}_verdict"]]
            else:
                cells += ["", ""]
        lines.append(f"| {_dataset_name(p['dataset'], p['tasks'])} | {p['split']} | {p['partition']} | "
                     f"{p['epsilon']:g} | {p['scheme']} | {p['baseline']} | {len(p['seeds'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + [""]) + "\n"


def _dataset_name(dataset: str, tasks: str) -> str:
    return dataset + (" (two tasks)" if tasks == "hetero" else "")


_GOAL_NAMES = {"paper-full-model": "paper full model", "fedavg-ft": "FedAvg + FT", "local": "local (DP)",
               "local-nodp": "local (no DP)"}


def _goal_md(goal: Sequence[Mapping]) -> str:
    if not goal:
        return ""
    eps = goal[0]["epsilon"]
    lines = [f"## Does joining pay? Goal table at ε = {eps:g}", "",
             "Final accuracy on each site's own held-out patients, averaged over sites (unweighted), mean "
             "[95% interval] over seeds. *Best block-wise*: of private-head and private-head-fusion, the one "
             "with the better validation accuracy in the tuning (chosen before the held-out results are seen). "
             "Below each setting: the paired difference best block-wise − baseline, [95% interval], verdict.", "",
             "| data set | split | partition | best block-wise | paper full model | FedAvg + FT | local (DP) "
             "| local (no DP) | majority class |", "|---|---|---|---|---|---|---|---|---|"]
    for g in goal:
        cells = []
        for name in ("best_blockwise", *GOAL_BASELINES):
            v = g["accuracy"].get(name)
            cells.append("" if v is None else _ci(v["mean"], v["ci95_low"], v["ci95_high"]))
        cells[0] = f"{g['best_blockwise']}: {cells[0]}"
        maj = "" if g["majority_class"] is None else f"{g['majority_class']:.3f}"
        lines.append(f"| {g['dataset']} | {g['split']} | {g['partition']} | " + " | ".join(cells) + f" | {maj} |")
        diffs = []
        for baseline in GOAL_BASELINES:
            d = g.get(f"vs_{baseline}", {}).get("accuracy")
            diffs.append("" if d is None else
                         f"{_ci(d['diff_mean'], d['ci95_low'], d['ci95_high'], True)} **{d['verdict']}**")
        lines.append("|  |  | Δ best block-wise − | | " + " | ".join(diffs) + " | |")
    lines.append("")
    verdicts = defaultdict(lambda: defaultdict(int))
    for g in goal:
        for baseline in GOAL_BASELINES:
            for m in ("accuracy", "macro_f1", "accuracy_weighted"):
                d = g.get(f"vs_{baseline}", {}).get(m)
                if d is not None:
                    verdicts[(baseline, m)][d["verdict"]] += 1
    lines += ["Wins / ties / losses of best block-wise over the settings above:", "",
              "| against | accuracy | accuracy (weighted) | macro-F1 |", "|---|---|---|---|"]
    for baseline in GOAL_BASELINES:
        cells = []
        for m in ("accuracy", "accuracy_weighted", "macro_f1"):
            v = verdicts[(baseline, m)]
            cells.append(f"{v['win']} / {v['tie']} / {v['loss']}" if v else "")
        lines.append(f"| {_GOAL_NAMES[baseline]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""]) + "\n"


def goal_verdict_counts(goal: Sequence[Mapping]) -> dict:
    """Per baseline and metric: how many settings best block-wise wins, ties and loses."""
    out: dict = {}
    for baseline in GOAL_BASELINES:
        for m in ALL_METRICS:
            counts = {"win": 0, "tie": 0, "loss": 0, "n/a": 0}
            for g in goal:
                d = g.get(f"vs_{baseline}", {}).get(m)
                if d is not None:
                    counts[d["verdict"]] += 1
            out.setdefault(baseline, {})[m] = counts
    return out


def _privacy_md(curves: Sequence[Mapping]) -> str:
    if not curves:
        return ""
    lines = ["## Privacy-utility", "", "Final site-averaged accuracy, mean [95% interval] over seeds, at each "
             "epsilon (δ = 1e-5, per site, over the whole run); local (no DP) spends nothing and is the same at "
             "every epsilon.", ""]
    for c in curves:
        eps = c["epsilons"]
        lines += [f"### {c['dataset']}, {c['split']}, {c['partition']}", "",
                  "| scheme | " + " | ".join(f"ε = {e:g}" for e in eps) + " |", "|---" * (len(eps) + 1) + "|"]
        for scheme in sorted(c["schemes"], key=lambda x: _order(_SCHEME_ORDER, x)):
            pts = {p["epsilon"]: p for p in c["schemes"][scheme]}
            if None in pts:
                p = pts[None]
                cells = [_ci(p["accuracy_mean"], p["ci95_low"], p["ci95_high"])] * len(eps)
            else:
                cells = [_ci(pts[e]["accuracy_mean"], pts[e]["ci95_low"], pts[e]["ci95_high"]) if e in pts else ""
                         for e in eps]
            lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
        maj = next((p["majority_class"] for pts in c["schemes"].values() for p in pts
                    if p.get("majority_class") is not None), None)
        if maj is not None:
            lines.append("| majority class | " + " | ".join([f"{maj:.3f}"] * len(eps)) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _tuning_md(tuning: Mapping | None) -> str:
    if not tuning:
        return ""
    space = tuning["search_space"]
    lines = ["## Hyperparameters chosen on validation", "",
             f"Every scheme got the same search: learning rate in {space['learning_rates']} x batch size in "
             f"{space['batch_sizes']} (Poisson expected batch with DP), on the {space['split']} split, "
             f"{', '.join(space['partitions'])} partition, seed(s) {space['seeds']}, {space['rounds']} rounds, at "
             f"ε in {space['epsilons']}. The sites of a tuning cell hold only their training patients (every "
             "held-out patient of the test cells is left out) and the score is the final site-averaged accuracy "
             "on a validation split carved from them. A cell at an epsilon not tuned uses the nearest tuned "
             "epsilon's choice (log scale).", "",
             "| data set | scheme | ε | chosen lr | chosen batch | validation accuracy | every candidate (lr/batch: acc) |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(tuning["choices"], key=lambda c: (_order(_DATASET_ORDER, c["dataset"]), c["tasks"],
                                                      _order(_SCHEME_ORDER, c["scheme"]), -(c["epsilon"] or 0))):
        cands = ", ".join(f"{x['learning_rate']:g}/{x['batch_size']}: {x['validation_accuracy']:.3f}"
                          for x in c["candidates"])
        eps = "no DP" if c["epsilon"] is None else f"{c['epsilon']:g}"
        lines.append(f"| {_dataset_name(c['dataset'], c['tasks'])} | {c['scheme']} | {eps} | {c['learning_rate']:g} "
                     f"| {c['batch_size']} | {c['validation_accuracy']:.3f} | {cands} |")
    return "\n".join(lines + [""]) + "\n"


def _settings_md(rows: Sequence[Mapping], gain_rows: Sequence[Mapping]) -> str:
    lines = ["## Every setting", "",
             "Final site-averaged metrics, mean ± standard deviation over seeds; *weighted*: sites weighted by "
             "their held-out size. Gain: BLOSSOM's relative gain over the paper-style full model in the same "
             "setting, on seed means.", "",
             "| data set | split | partition | ε | scheme | lr | batch | accuracy | accuracy (weighted) | macro-F1 "
             "| macro-F1 (weighted) | gain (accuracy) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gain_by = {tuple(g[k] for k in _SETTING): g for g in gain_rows}
    sel = [r for r in rows if r["aggregation"] != "plaintext"]
    sel.sort(key=lambda r: (r["tasks"], _order(_DATASET_ORDER, r["dataset"]), _order(_SPLIT_ORDER, r["split"]),
                            r["partition"], r["dp"], -(r["epsilon"] or 8.0), _order(_SCHEME_ORDER, r["scheme"])))
    for r in sel:
        g = gain_by.get(tuple(r[k] for k in _SETTING))
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        cells = [_fmt(r[f"{m}_mean"], r[f"{m}_std"]) if f"{m}_mean" in r else ""
                 for m in ("accuracy", "accuracy_weighted", "macro_f1", "macro_f1_weighted")]
        lines.append(f"| {_dataset_name(r['dataset'], r['tasks'])} | {r['split']} | {r['partition']} | {eps} | "
                     f"{r['scheme']} | {'/'.join(f'{x:g}' for x in r['learning_rate'] if x is not None)} | "
                     f"{'/'.join(str(x) for x in r['batch_size'] if x is not None)} | " + " | ".join(cells)
                     + f" | {_pct(g['accuracy_gain_pct']) if g else ''} |")
    return "\n".join(lines + [""]) + "\n"


def _twins_md(twins: Sequence[Mapping]) -> str:
    if not twins:
        return ""
    lines = ["## Secure aggregation vs plaintext aggregation (same seeds)", "",
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
    return "\n".join(lines + [""]) + "\n"


# ------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_privacy_utility(curves: Sequence[Mapping]) -> bytes | None:
    """One panel per curve setting: accuracy against epsilon (log scale) per scheme with
    95% intervals; local without DP and the majority class as horizontal references."""
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.8), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], curves, strict=True):
        eps = c["epsilons"]
        for k, scheme in enumerate(sorted(c["schemes"], key=lambda x: _order(_SCHEME_ORDER, x))):
            pts = c["schemes"][scheme]
            colour = _COLOURS.get(scheme, "#999999")
            if len(pts) == 1 and pts[0]["epsilon"] is None:
                p = pts[0]
                ax.axhline(p["accuracy_mean"], color=colour, linestyle="--", linewidth=1.2, label=f"{scheme}")
                if not math.isnan(p["ci95_low"]):
                    ax.axhspan(p["ci95_low"], p["ci95_high"], color=colour, alpha=0.12)
                continue
            pts = [p for p in pts if p["epsilon"] is not None]
            xs = np.array([p["epsilon"] for p in pts]) * (1 + 0.03 * (k - 2))  # a small offset per scheme
            ys = np.array([p["accuracy_mean"] for p in pts])
            err = np.array([[p["accuracy_mean"] - p["ci95_low"], p["ci95_high"] - p["accuracy_mean"]] for p in pts]).T
            ax.errorbar(xs, ys, yerr=np.nan_to_num(err), marker="o", markersize=4, capsize=3, color=colour,
                        label=scheme)
        maj = next((p["majority_class"] for pts in c["schemes"].values() for p in pts
                    if p.get("majority_class") is not None), None)
        if maj is not None:
            ax.axhline(maj, color="#777777", linestyle=":", linewidth=1.2, label="majority class")
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.set_xlabel("ε per site (δ = 1e-5)")
        ax.set_title(f"{c['dataset']}, {c['split']}, {c['partition']}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (site average, held out)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Privacy-utility: final accuracy vs epsilon (mean and 95% interval over seeds)", fontsize=11)
    return _png(fig)


def _plot_curves(results: Sequence[Mapping], dataset: str, epsilon: float, schemes: Sequence[str]) -> bytes | None:
    """Accuracy against round, one panel per split x partition at ``epsilon``: the mean over
    seeds with a band of ± one standard deviation, and the majority-class rate."""
    sel = [r for r in results if r["cell"]["dataset"] == dataset and r["cell"]["tasks"] == "single"
           and r["cell"]["aggregation"] != "plaintext" and r["cell"]["dp"] == "on"
           and _epsilon_of(r["cell"]) in (epsilon, None) and r["cell"]["scheme"] in schemes]
    splits = [s for s in _SPLIT_ORDER if any(r["cell"]["split"] == s for r in sel)]
    partitions = [p for p in ("iid", "dirichlet") if any(r["cell"]["partition"] == p for r in sel)]
    if not splits or not partitions:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(partitions), len(splits), figsize=(4.2 * len(splits), 3.2 * len(partitions)),
                             squeeze=False, sharey=True)
    for i, partition in enumerate(partitions):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            here = [r for r in sel if r["cell"]["split"] == split and r["cell"]["partition"] == partition]
            for scheme in schemes:
                rs = [r for r in here if r["cell"]["scheme"] == scheme]
                if not rs:
                    continue
                n = min(len(r["curve"]) for r in rs)
                ys = np.array([[r["curve"][k]["accuracy"] for k in range(n)] for r in rs])
                mean, std = ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(rs) > 1 else np.zeros(n)
                xs = np.arange(1, n + 1)
                ax.plot(xs, mean, color=_COLOURS.get(scheme, "#999999"), label=scheme, linewidth=1.3)
                ax.fill_between(xs, mean - std, mean + std, color=_COLOURS.get(scheme, "#999999"), alpha=0.15)
            majority = [r.get("majority_class_accuracy") for r in here if r.get("majority_class_accuracy") is not None]
            if majority:
                ax.axhline(float(np.mean(majority)), color="#777777", linestyle=":", label="majority class")
            ax.set_title(f"{split}, {partition}", fontsize=10)
            ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{dataset} at ε = {epsilon:g}: site-averaged held-out accuracy vs round "
                 f"(mean ± 1 sd over seeds)", fontsize=11)
    return _png(fig)


def _plot_goal(goal: Sequence[Mapping], metric: str = "accuracy") -> bytes | None:
    """Best block-wise − each baseline, per setting, with 95% intervals on one common axis."""
    if not goal:
        return None
    plt = _plt()
    labels = [f"{g['dataset']} / {g['split']} / {g['partition']}" for g in goal]
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(goal) + 1.6))
    offsets = np.linspace(-0.3, 0.3, len(GOAL_BASELINES))
    colours = {"paper-full-model": "#000000", "fedavg-ft": "#8e24aa", "local": "#c62828", "local-nodp": "#ef6c00"}
    for k, baseline in enumerate(GOAL_BASELINES):
        ys, xs, lo, hi = [], [], [], []
        for i, g in enumerate(goal):
            d = g.get(f"vs_{baseline}", {}).get(metric)
            if d is None:
                continue
            ys.append(len(goal) - 1 - i + offsets[k])
            xs.append(d["diff_mean"])
            lo.append(d["diff_mean"] - d["ci95_low"] if not math.isnan(d["ci95_low"]) else 0.0)
            hi.append(d["ci95_high"] - d["diff_mean"] if not math.isnan(d["ci95_high"]) else 0.0)
        if xs:
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", markersize=4, capsize=2, color=colours[baseline],
                        label=f"vs {_GOAL_NAMES[baseline]}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(goal)), labels[::-1], fontsize=8)
    ax.set_xlabel(f"best block-wise − baseline, {metric.replace('_', '-')} (paired, 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"Does joining pay? ε = {goal[0]['epsilon']:g}; right of 0: joining is better", fontsize=10)
    return _png(fig)


def _png(fig) -> bytes:
    """Lay out ``fig``, render it as PNG bytes, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# The report


_CELL_COLUMNS = ("dataset", "tasks", "split", "partition", "scheme", "dp", "epsilon", "learning_rate", "batch_size",
                 "seed", "aggregation", "stage")


def _cell_row(r: Mapping) -> dict:
    c = r["cell"]
    weighted = r.get("final_weighted_by_holdout") or {}
    return {**{k: c.get(k) for k in _CELL_COLUMNS}, "epsilon": _epsilon_of(c), "rounds": r["rounds"],
            "accuracy": r["final"]["accuracy"], "macro_f1": r["final"]["macro_f1"],
            "accuracy_weighted": weighted.get("accuracy"), "macro_f1_weighted": weighted.get("macro_f1"),
            "majority_class_accuracy": r.get("majority_class_accuracy"), "epsilon_max": r["epsilon_max"],
            "declined_site_rounds": r["declined_site_rounds"], "bytes_to_coordinator": r["bytes_to_coordinator"],
            "wall_s": r["wall_s"]}


def write_report(results: Sequence[Mapping], out_dir: Path, *, config_text: str, command: str,
                 runs: Sequence[Mapping], tuning: Mapping | None = None,
                 tuning_results: Sequence[Mapping] = (), target_epsilon: float = 8.0) -> dict:
    """Write ``cells.csv``, ``curves.csv``, ``sites.csv``, ``cells.json``, ``tuning.json``,
    ``tuning_cells.csv``, ``summary.json``, ``tables.md`` and the PNG plots into
    ``out_dir``. Returns the summary document."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = sorted(results, key=lambda r: r["key"])
    rows = summarise(results)
    gain_rows = gains(rows)
    twins = secure_vs_plaintext(results)
    paired = paired_comparisons(results)
    checks = parameter_checks(results)
    goal = goal_table(results, epsilon=target_epsilon, tuning=tuning)
    curves = privacy_utility(rows)

    cell_rows = [_cell_row(r) for r in results]
    curve_rows = [{**{k: r["cell"].get(k) for k in _CELL_COLUMNS}, **point} for r in results for point in r["curve"]]
    metric_cols = ["rounds", "accuracy", "macro_f1", "accuracy_weighted", "macro_f1_weighted",
                   "majority_class_accuracy", "epsilon_max", "declined_site_rounds", "bytes_to_coordinator", "wall_s"]
    atomic_write(out_dir / "cells.csv", _csv_bytes(cell_rows, [*_CELL_COLUMNS, *metric_cols]))
    atomic_write(out_dir / "curves.csv", _csv_bytes(curve_rows, [*_CELL_COLUMNS, "round", "accuracy", "macro_f1"]))
    atomic_write(out_dir / "tuning_cells.csv", _csv_bytes([_cell_row(r) for r in sorted(tuning_results,
                                                                                       key=lambda r: r["key"])],
                                                          [*_CELL_COLUMNS, *metric_cols]))
    site_cols = ["site", "accuracy", "macro_f1", "n_train", "n_holdout", "majority_class_accuracy",
                 "noise_multiplier", "sample_rate", "steps_per_round", "epsilon"]
    site_rows = [{"key": r["key"], "site": site, **{k: v for k, v in values.items() if k in site_cols},
                  "modalities": "+".join(values.get("modalities", ())), "tasks": "+".join(values.get("tasks", ()))}
                 for r in results for site, values in sorted(r["sites"].items())]
    atomic_write(out_dir / "sites.csv", _csv_bytes(site_rows, ["key", *site_cols, "modalities", "tasks"]))
    # Every result but its curve (curves.csv) and its per-site rows (sites.csv), with metrics
    # rounded to 6 significant digits: far below the seed-to-seed spread, and it keeps the
    # committed raw results small.
    atomic_write(out_dir / "cells.json",
                 json.dumps(_rounded([{k: v for k, v in r.items() if k not in ("curve", "sites")} for r in results]),
                            indent=None, separators=(",", ":")).encode() + b"\n")
    if tuning is not None:
        atomic_write(out_dir / "tuning.json", json.dumps(_rounded(tuning), indent=1).encode() + b"\n")
    summary = {
        "command": command,
        "config": config_text,
        "runs": list(runs),
        "cells": len(results),
        "tuning_cells": len(tuning_results),
        "cell_wall_s_sum": float(sum(r["wall_s"] for r in results)),
        "epsilon_max_over_all_sites": max((r["epsilon_max"] for r in results if r["epsilon_max"] is not None),
                                          default=None),
        "declined_site_rounds": int(sum(r["declined_site_rounds"] for r in results)),
        "goal": goal,
        "goal_verdicts": goal_verdict_counts(goal),
        "privacy_utility": curves,
        "settings": [{k: v for k, v in r.items() if k not in ("curve", "curve_std")} for r in rows],
        "gains_over_paper_full_model": gain_rows,
        "paired": paired,
        "secure_vs_plaintext": twins,
        "secure_vs_plaintext_parameters": checks,
        "tuning": tuning,
    }
    md = ["<!-- Generated by `blossom experiment` from cells.json and tuning.json; do not edit by hand. -->", "",
          _goal_md(goal), _privacy_md(curves), _settings_md(rows, gain_rows), _paired_md(paired), _tuning_md(tuning),
          _parameter_checks_md(checks), _twins_md(twins)]
    atomic_write(out_dir / "tables.md", "\n".join(x for x in md if x).encode())
    plots = []
    for name, png in [("goal_accuracy.png", _plot_goal(goal, "accuracy")),
                      ("goal_macro_f1.png", _plot_goal(goal, "macro_f1")),
                      ("privacy_utility.png", _plot_privacy_utility(curves))]:
        if png is not None:
            atomic_write(out_dir / name, png)
            plots.append(name)
    schemes = [s for s in _SCHEME_ORDER if s not in ("full-model", "private-head-fedavgm")]
    for dataset in sorted({r["cell"]["dataset"] for r in results}, key=lambda d: _order(_DATASET_ORDER, d)):
        png = _plot_curves(results, dataset, target_epsilon, schemes)
        if png is not None:
            name = f"curves_{dataset}.png"
            atomic_write(out_dir / name, png)
            plots.append(name)
    summary["plots"] = plots
    atomic_write(out_dir / "summary.json", json.dumps(_rounded(summary), indent=1, allow_nan=True).encode() + b"\n")
    return summary
