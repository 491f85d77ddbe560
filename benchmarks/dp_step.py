"""DP training step benchmark: the site's DP-SGD step against a bare Opacus step and a plain step.

Run ``python benchmarks/dp_step.py --json`` to print one JSON document measured in one run on
this machine (``--quick`` measures the demo model only). Two models:

* ``demo``: the demo federation's model (``sites/federation.toml``: the small MONAI
  ``Regressor`` CNN on 32x32 images, the tabular MLP, fusion and both heads), batch 64;
* ``densenet121``: the same layout with the image encoder MONAI ``DenseNet121`` 2D on
  128x128 images (group norm), batch 32.

For each model three kinds of step run on the same synthetic patients, expected batch size
and grad-sample mode:

* ``project``: :func:`blossom_secure.site.training.train_dp` itself (keyed Poisson sampling
  and keyed noise from :mod:`blossom_secure.site.dp_random`, Opacus's clipping, the ledger's
  accounting check). The step time is taken between the ends of successive optimizer steps
  inside that one call, so the round's one-time set-up (Opacus wrapping and validating the
  model, the loader) is reported apart as ``setup_s``;
* ``opacus``: a bare Opacus step: ``PrivacyEngine.make_private`` on the same model, a plain
  ``DataLoader`` (Opacus's own Poisson sampling and noise), the same loss;
* ``plain``: plain SGD, no clipping and no noise, shuffled batches of the same size.

Every configuration runs in its own fresh process (so that peak resident memory,
``ru_maxrss``, belongs to that configuration alone), one torch thread unless
``--threads`` says otherwise, and the configurations of a model take turns (``--repeats``
rounds of project, opacus, plain, ...), so that a change in the machine's load hits them
alike. Reported per configuration: the median step time of each repetition and the best of
those, the set-up time and the peak RSS; per model the ratios ``project / opacus`` (the
project's cost around Opacus; target <= 1.15), ``project / plain`` (what DP costs here;
target <= 2.0) and the peak RSS (target <= 3 GiB for DenseNet121). ``loadavg_1m`` records
how busy the machine was: the ratios are meaningful on a loaded machine, the seconds are not.

The project's DenseNet121 step is also measured with ``--physical`` patients per physical
batch (``train_dp(max_physical_batch_size=...)``, default 8; 0 leaves it out): the logical
Poisson batch, its clipping, its one noise draw and its one accounted step are unchanged,
only the per-sample gradients and activations held at once shrink.

Grad-sample mode (``--modes``, default ``hooks,ew``: the bare Opacus step is measured in
each). The project uses Opacus's backward ``hooks``: measured here (one thread, 2 CPUs,
load average 3-5), ``ew`` (expanded weights) fails on MONAI's DenseNet121 2D under Opacus
1.6 (``view size is not compatible with input tensor's size and stride``) and on the demo
model is no faster than hooks (ew over plain 3.08x, hooks 2.96x); ``functorch`` and
``ghost`` are slower on DenseNet121 (measured earlier at two threads: hooks 6.0 s, ew 6.0 s,
functorch 8.3 s, ghost 7.8 s per step) and ghost clipping needs its own loss wrapper.

Measured (one run, one thread per process, load average 3.3 -> 5.4 on 2 CPUs; seconds
are the best repetition, ratios the median of side-by-side pairs):

* demo, batch 64: project 0.054 s, bare Opacus (hooks) 0.063 s, plain 0.021 s per step;
  project / Opacus 0.87, project / plain 2.8 (bare Opacus itself 3.0x plain: on a model this
  small the per-sample hooks cost more than the model); peak RSS about 515 MiB each.
* DenseNet121 2D 128x128, batch 32: project 19.0 s, bare Opacus 16.4 s, plain 8.5 s per
  step; project / Opacus 0.93 (1.16 in the quieter pair), project / plain 1.86; peak RSS
  project 4.2 GiB, bare Opacus 3.5 GiB, plain 2.1 GiB. A quieter run (load 1.1 -> 2.3, one
  repetition, ``--physical 8``): project 12.5 s, in physical batches of 8 14.0 s, bare
  Opacus 9.9 s, plain 5.4 s; project / Opacus 1.26 (1.41 in physical batches), project /
  plain 2.30 (2.57); peak RSS project 4.0 GiB, in physical batches of 8 1.2 GiB (below the
  plain step's 2.1 GiB), bare Opacus 3.5 GiB. What remains of the project's cost over bare
  Opacus on DenseNet121 is most likely the keyed noise (float64 Box-Muller, four normals per
  coordinate, for 7M coordinates; not yet profiled on this network).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: model -> (batch size, patients, image size, architecture)
MODELS = {
    "demo": {"batch_size": 64, "patients": 512, "size": None, "architecture": None},
    "densenet121": {"batch_size": 32, "patients": 256, "size": (128, 128), "architecture": "densenet121"},
}
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0


def _layout(model: str):
    from blossom_secure.config import load_federation

    layout = load_federation(ROOT / "sites" / "federation.toml").layout
    spec = MODELS[model]
    if spec["architecture"] is not None:
        image = dataclasses.replace(layout.image, architecture=spec["architecture"], size=spec["size"])
        layout = dataclasses.replace(layout, image=image)
    return layout


def _site_tensors(layout, n: int):
    """Synthetic patients: every modality present, both labels (a deterministic generator)."""
    import torch

    from blossom_secure.site.training import SiteTensors

    g = torch.Generator().manual_seed(0)
    features = len(layout.tabular.features)
    return SiteTensors(
        image=torch.rand((n, 1, *layout.image.size), generator=g),
        image_present=torch.ones(n),
        tabular=torch.randn((n, features), generator=g),
        tabular_present=torch.ones(n),
        labels={t: torch.randint(0, k, (n,), generator=g) for t, k in layout.tasks.items()},
    )


def _worker(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    from blossom_secure.model import BlockModel
    from blossom_secure.site import training
    from blossom_secure.site.dp_random import DPRandomness

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    layout = _layout(spec["model"])
    model = BlockModel(layout, ("image", "tabular"), tuple(layout.tasks))
    batch = MODELS[spec["model"]]["batch_size"]
    n = MODELS[spec["model"]]["patients"]
    data = _site_tensors(layout, n)
    steps = spec["warmup"] + spec["steps"]
    ends: list[float] = []
    started = time.perf_counter()
    if spec["kind"] == "project":
        original_step = training._KeyedNoiseDPOptimizer.step

        def timed_step(self, *args, **kwargs):
            out = original_step(self, *args, **kwargs)
            if not self._is_last_step_skipped:  # the end of a logical step, not of a physical part
                ends.append(time.perf_counter())
            return out

        training._KeyedNoiseDPOptimizer.step = timed_step
        plan = training.RoundPlan(noise_multiplier=NOISE_MULTIPLIER, sample_rate=batch / n, steps=steps,
                                  batch_size=batch, epochs=1)
        training.train_dp(model, data, plan, max_grad_norm=MAX_GRAD_NORM, learning_rate=0.05, momentum=0.9,
                          randomness=DPRandomness.seeded_simulation(0, site_id="benchmark", round_id=1),
                          max_physical_batch_size=spec.get("physical"))
    else:
        dataset, unpack = training._dataset(model, data)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if spec["kind"] == "opacus":
            from opacus import PrivacyEngine

            loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
                    max_grad_norm=MAX_GRAD_NORM, grad_sample_mode=spec["mode"])
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0), drop_last=True)
        model.train()
        done = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while done < steps:
                for b in loader:
                    inputs, labels = unpack(b)
                    optimizer.zero_grad(set_to_none=True)
                    loss = training._loss(model(*inputs), labels)
                    loss.backward()
                    optimizer.step()
                    float(loss.detach())
                    ends.append(time.perf_counter())
                    done += 1
                    if done == steps:
                        break
    gaps = [b - a for a, b in zip(ends[spec["warmup"] - 1:], ends[spec["warmup"]:], strict=False)]
    step_s = statistics.median(gaps)
    return {
        "step_s": step_s,
        "setup_s": max(0.0, ends[0] - started - step_s),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def _run_worker(spec: dict, timeout_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _name(kind: str, mode: str, physical: int | None) -> str:
    return f"{kind}/{mode}" + (f"/physical{physical}" if physical is not None else "")


def measure_model(model: str, *, modes: list[str], repeats: int, steps: int, warmup: int, threads: int,
                  timeout_s: float, physical: int | None = None) -> dict:
    configs = [("project", "hooks", None)] + [("opacus", m, None) for m in modes] + [("plain", "-", None)]
    if physical is not None:
        configs.insert(1, ("project", "hooks", physical))
    runs: dict[str, list[dict]] = {_name(k, m, p): [] for k, m, p in configs}
    for _ in range(repeats):
        for kind, mode, part in configs:
            spec = {"model": model, "kind": kind, "mode": mode, "steps": steps, "warmup": warmup,
                    "threads": threads, "physical": part}
            runs[_name(kind, mode, part)].append(_run_worker(spec, timeout_s))
    out: dict = {"batch_size": MODELS[model]["batch_size"], "configs": {}}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out["configs"][name] = {"error": results[-1]["error"]}
            continue
        out["configs"][name] = {
            "step_s": round(min(r["step_s"] for r in ok), 4),
            "step_s_each": [round(r["step_s"], 4) for r in ok],
            "setup_s": round(statistics.median(r["setup_s"] for r in ok), 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in ok), 1),
        }
    c = out["configs"]

    def ratio(a: str, b: str) -> float | None:
        if "step_s" not in c.get(a, {}) or "step_s" not in c.get(b, {}):
            return None
        # Ratio of each repetition's side-by-side pair, then the median: load changes between
        # repetitions cancel.
        pairs = [x / y for x, y in zip(c[a]["step_s_each"], c[b]["step_s_each"], strict=False)]
        return round(statistics.median(pairs), 3)

    out["ratios"] = {
        "project_over_opacus": ratio("project/hooks", "opacus/hooks"),
        "project_over_plain": ratio("project/hooks", "plain/-"),
    }
    if physical is not None:
        name = _name("project", "hooks", physical)
        out["ratios"][f"{name.replace('/', '_')}_over_opacus"] = ratio(name, "opacus/hooks")
        out["ratios"][f"{name.replace('/', '_')}_over_plain"] = ratio(name, "plain/-")
    for m in modes:
        out["ratios"][f"opacus_{m}_over_plain"] = ratio(f"opacus/{m}", "plain/-")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="the demo model only")
    parser.add_argument("--modes", default="hooks,ew", help="grad-sample modes of the bare Opacus step")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--physical", type=int, default=8,
                        help="also the project's DenseNet121 step in physical batches of this size (0: not)")
    parser.add_argument("--only", choices=sorted(MODELS), help="measure this model only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    started = time.perf_counter()
    report: dict = {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "models": {},
    }
    if args.only in (None, "demo"):
        report["models"]["demo"] = measure_model("demo", modes=modes, repeats=args.repeats or 5, steps=20,
                                                 warmup=3, threads=args.threads, timeout_s=300)
    if not args.quick and args.only in (None, "densenet121"):
        report["models"]["densenet121"] = measure_model(
            "densenet121", modes=modes, repeats=args.repeats or 2, steps=3, warmup=1, threads=args.threads,
            timeout_s=600, physical=args.physical or None)
    report["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    report["total_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report))
    else:
        for model, result in report["models"].items():
            print(f"{model} (batch {result['batch_size']}):")
            for name, row in result["configs"].items():
                if "error" in row:
                    print(f"  {name:<16} error: {row['error']}")
                    continue
                print(f"  {name:<16} {row['step_s']:8.4f} s/step  set-up {row['setup_s']:6.2f} s  "
                      f"peak RSS {row['peak_rss_mib']:8.1f} MiB")
            for name, value in result["ratios"].items():
                print(f"  {name:<24} {value}")
        print(f"load average {report['loadavg_1m_start']} -> {report['loadavg_1m_end']}, {report['cpus']} cpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
