"""Attacks on the privacy claims of a site, one test per attack (review of the DP layer).

Each test is named after what an attacker would do; it fails if the attack works.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from blossom_secure.config import load_federation

from blossom_secure.site.config import load_site
from blossom_secure.site.dp_random import DPRandomness
from blossom_secure.errors import PolicyError
from blossom_secure.runtimes.embedded.federation import simulate
from blossom_secure.site.ledger import PrivacyLedger
from blossom_secure.site.agent import SiteAgent

pytestmark = pytest.mark.slow


def _copy(src: Path, dest: Path, *, plaintext: bool = True) -> Path:
    shutil.copytree(src.parent / "policies", dest / "policies")
    shutil.copytree(src, dest / "sites")
    if plaintext:
        for policy in (dest / "policies").glob("*.toml"):
            policy.write_text(policy.read_text().replace("required = true", "required = false"))
    return dest / "sites"


def _as_real_site(site_dir: Path) -> None:
    """Turn an example site into one that looks real: no ``[synth]`` section (its data stay)."""
    text = (site_dir / "site.toml").read_text()
    (site_dir / "site.toml").write_text(text[: text.index("[synth]")] if "[synth]" in text else text)


def _records(site_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (site_dir / "state" / "audit.jsonl").read_text().splitlines()]


def _ledger(sites: Path, site_id: str) -> PrivacyLedger:
    fed = load_federation(sites / "federation.toml")
    site = load_site(sites / site_id, federation=fed)
    return PrivacyLedger(site.state_dir / "ledger.json", site_id=site_id, terms=site.policy.privacy)


# -- 1. DP noise from a public seed -----------------------------------------------------------


def test_public_seed_cannot_regenerate_the_noise_of_a_real_site(tiny_sites_with_data, tmp_path):
    """Attack: knowing ``blossom simulate``'s seed, regenerate a site's DP noise and subtract
    it. Two runs with the same seed on a site without ``[synth]`` must differ (the noise is
    drawn from the OS CSPRNG), and its ledger and audit log claim a guarantee only then."""
    runs = []
    for name in ("a", "b"):
        sites = _copy(tiny_sites_with_data, tmp_path / name)
        for d in sites.iterdir():
            if d.is_dir():
                _as_real_site(d)
        simulate(sites_root=sites, rounds=1, out_dir=tmp_path / name / "out", seed=0, secure=False)
        with np.load(tmp_path / name / "out" / "global_blocks.npz") as g:
            runs.append({k: g[k] for k in g.files})
        ledger = _ledger(sites, "st-mary")
        assert [e.randomness for e in ledger.entries] == ["os-csprng"]
        finished = [r for r in _records(sites / "st-mary") if r["event"] == "training_finished"]
        assert finished and all(r["details"]["randomness"] == "os-csprng" for r in finished)
        assert all(r["details"]["epsilon_is_nominal"] is False for r in finished)
    a, b = runs
    assert set(a) == set(b)
    for block in a:  # same seed, same data, same initial values: only the noise differs
        assert not np.array_equal(a[block], b[block]), block


def test_public_seed_cannot_regenerate_the_noise_of_a_real_site_trained_in_a_worker(tiny_sites_with_data, tmp_path):
    """Attack: the same as above, on a run that trains in worker processes
    (``--workers``): the worker gets the site's training terms, not its agent, so the
    terms must carry no seed for a real site, the ledger and the worker's noise must both
    be the OS CSPRNG's, and two trainings from the same blocks, data and simulation seed
    must differ. A synthetic site's terms carry the seed, and then they do not differ."""
    from blossom_secure.runtimes.embedded.training_pool import _job_of, run_job

    sites = _copy(tiny_sites_with_data, tmp_path / "s")
    _as_real_site(sites / "st-mary")
    federation = load_federation(sites / "federation.toml")
    for site, real in (("st-mary", True), ("lakeside", False)):
        agent = SiteAgent(sites / site, federation, seed=0)
        try:
            pending = agent.begin_offer(round_id=0, global_blocks={}, secure=True)
            job = _job_of(agent, pending)
            assert (job.terms.seeded_noise_seed is None) is real
            assert pending.randomness == ("os-csprng" if real else "seeded-simulation")
            assert [e.randomness for e in agent.ledger.entries] == [pending.randomness]
            (_, first), (_, second) = run_job(job), run_job(job)
            same = all(np.array_equal(first[b], second[b]) for b in first)
            assert same is not real, site
        finally:
            agent.audit.close()


def test_seeded_simulation_is_labelled_nominal_everywhere(tiny_sites_with_data, tmp_path):
    """A seeded run on synthetic sites is reproducible, so its epsilon cannot be a guarantee:
    the ledger, the audit log and metrics.json must all say so."""
    runs = []
    for name in ("a", "b"):
        sites = _copy(tiny_sites_with_data, tmp_path / name)
        result = simulate(sites_root=sites, rounds=1, out_dir=tmp_path / name / "out", seed=3, secure=False)
        with np.load(result.out_dir / "global_blocks.npz") as g:
            runs.append({k: g[k] for k in g.files})
        for site_id in ("st-mary", "lakeside"):
            assert [e.randomness for e in _ledger(sites, site_id).entries] == ["seeded-simulation"]
            finished = [r for r in _records(sites / site_id) if r["event"] == "training_finished"]
            assert [r["details"]["epsilon_is_nominal"] for r in finished] == [True]
        doc = json.loads(result.metrics_path.read_text())
        assert doc["metrics"] and all(row["epsilon_nominal"] for row in doc["metrics"])
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])  # reproducible, hence nominal


def test_csprng_noise_is_not_a_function_of_anything_public():
    """Two CSPRNG sources never agree; two seeded ones with the same seed, site and round do."""
    a, b = DPRandomness.from_os_csprng(), DPRandomness.from_os_csprng()
    assert a.is_private and not np.array_equal(a.standard_normal(64), b.standard_normal(64))
    s1 = DPRandomness.seeded_simulation(0, site_id="x", round_id=1)
    s2 = DPRandomness.seeded_simulation(0, site_id="x", round_id=1)
    assert not s1.is_private and np.array_equal(s1.standard_normal(64), s2.standard_normal(64))


def test_dp_noise_is_standard_normal():
    """The keyed-stream sampler draws N(0, 1): mean, variance and tails of 200k draws."""
    x = DPRandomness.seeded_simulation(7, site_id="stats", round_id=0).standard_normal(200_000)
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1.0) < 0.015
    assert abs(np.mean(np.abs(x) > 1.96) - 0.05) < 0.003
    u = DPRandomness.seeded_simulation(7, site_id="stats", round_id=1).uniform(200_000)
    assert 0.0 < u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.003


def test_batched_noise_is_the_per_tensor_noise_bit_for_bit():
    """Drawing a step's noise for all parameters in one pass (fast path) gives exactly the
    values, from the same stretch of the stream, of one draw per parameter (reference):
    the noise of a round does not depend on how it was computed."""
    import torch

    shapes = [(1,), (3,), (4, 1, 3, 3), (2, 5), (600_000,), (300_000, 3), (7,)]
    refs = [torch.zeros(s) for s in shapes] + [torch.zeros(3, dtype=torch.float64)]
    reference = DPRandomness.seeded_simulation(3, site_id="x", round_id=1)
    fast = DPRandomness.seeded_simulation(3, site_id="x", round_id=1)
    expected = [reference.gaussian_like(r, 0.7) for r in refs]
    got = fast.gaussian_like_each(refs, 0.7)
    assert len(got) == len(expected)
    assert all(g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected))
    assert np.array_equal(reference.uniform(8), fast.uniform(8))  # the stream continues in step


def test_seeded_noise_stream_is_pinned_so_a_faster_sampler_cannot_change_a_simulation():
    """The keystream, uniforms, normals and per-tensor noise of one seeded source, in that
    order, hash to the value the sampler has always given: a change to how they are
    computed (chunking, in-place arithmetic, the float32 rounding) that changed one bit
    would change every seeded simulation's results."""
    import hashlib

    import torch

    r = DPRandomness.seeded_simulation(0, site_id="pin", round_id=1)
    stream = r.random_bytes(3 * (1 << 20) + 5)  # three whole chunks and a tail
    normals = r.standard_normal(1001)
    uniforms = r.uniform(999)
    noise = r.gaussian_like_each([torch.zeros(5, 3), torch.zeros(70_001), torch.zeros(2, dtype=torch.float64)], 0.7)
    digest = hashlib.sha256(stream + normals.tobytes() + uniforms.tobytes()
                            + b"".join(t.numpy().tobytes() for t in noise)).hexdigest()
    assert digest == "a9e89afda2c12bb97356837667160f7e64a58a6a283437782cc7913b470dd63d"


def test_training_batches_are_the_keyed_sampler_batches():
    """The training loop's batches hold exactly the patients the keyed Poisson sampler drew,
    empty batches included, as a DataLoader over the same sampler would give them."""
    import torch

    from blossom_secure.site.dp_random import PoissonBatchSampler
    from blossom_secure.site.training import _poisson_batches

    tensors = (torch.arange(40.0).reshape(20, 2), torch.arange(20))
    def sampler():
        return PoissonBatchSampler(num_samples=20, sample_rate=0.05, steps=30,
                                   randomness=DPRandomness.seeded_simulation(1, site_id="x", round_id=2))
    draws = list(sampler())
    batches = list(_poisson_batches(sampler(), tensors))
    assert len(batches) == 30 and any(not d for d in draws)
    for idx, batch in zip(draws, batches):
        assert batch[0].shape == (len(idx), 2) and torch.equal(batch[1], torch.tensor(idx, dtype=torch.int64))
        assert torch.equal(batch[0], tensors[0][idx])


# -- 2. Data-dependent preprocessing ----------------------------------------------------------


def test_federation_file_without_public_scaling_is_refused(tmp_path):
    """Scaling that is not declared would have to be computed from the patients: refused."""
    fed = tmp_path / "federation.toml"
    text = (Path(__file__).resolve().parents[1] / "sites" / "federation.toml").read_text()
    text = re.sub(r"\[model\.tabular\.scaling\].*?\n\n", "", text, flags=re.S)
    fed.write_text(text)
    with pytest.raises(PolicyError, match="model.tabular.scaling"):
        load_federation(fed)


def test_extreme_patient_does_not_change_what_other_patients_feed_the_model(tiny_sites_with_data, tmp_path):
    """Attack (membership): add one patient with crp = 1e5. With scaling from the site's own
    statistics every other patient's input moved, so the released update revealed whether
    that patient was present. With public scaling, the other patients' inputs stay
    bit-identical."""
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    fed = load_federation(sites / "federation.toml")
    before = SiteAgent(sites / "riverside", fed, seed=0)
    sites = _copy(tiny_sites_with_data, tmp_path / "y")  # the same hospital, one patient later
    csv_path = sites / "riverside" / "data" / "clinical.csv"
    rows = list(csv.DictReader(csv_path.open(newline="")))
    extreme = dict(rows[0], patient_id="riverside-extreme", crp="100000")
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*rows, extreme])
    after = SiteAgent(sites / "riverside", load_federation(sites / "federation.toml"), seed=0)
    ids_before = list(before.arrays.patient_ids)
    ids_after = list(after.arrays.patient_ids)
    rows_after = [ids_after.index(p) for p in ids_before]
    assert np.array_equal(after.tensors.tabular[rows_after].numpy(), before.tensors.tabular.numpy())


# -- 3. Exact counts released -----------------------------------------------------------------


def test_one_added_patient_does_not_move_the_released_weight(tiny_sites_with_data, tmp_path):
    """Attack: difference two rounds' per-block weight sums to learn each site's exact
    count. The weight a site contributes is the federation file's public number, not its
    training-set size, so one more patient changes nothing the coordinator sees."""
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    fed = load_federation(sites / "federation.toml")
    agent = SiteAgent(sites / "riverside", fed, seed=0)
    offer = agent.offer(round_id=0, global_blocks={}, secure=True)
    sites = _copy(tiny_sites_with_data, tmp_path / "y")  # the same hospital, one patient fewer
    csv_path = sites / "riverside" / "data" / "clinical.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")
    smaller = SiteAgent(sites / "riverside", load_federation(sites / "federation.toml"), seed=0)
    assert smaller.n_train != agent.n_train or len(smaller.arrays.patient_ids) != len(agent.arrays.patient_ids)
    offer2 = smaller.offer(round_id=1, global_blocks={}, secure=True)
    assert offer.contribution.weight == offer2.contribution.weight == 1


def test_declared_weights_are_the_public_numbers(tiny_sites_with_data, tmp_path):
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    fed_path = sites / "federation.toml"
    fed_path.write_text(fed_path.read_text().replace('scheme = "equal"', 'scheme = "declared"\n\n[weighting.sites]\n'
                                                     'riverside = 500\nst-mary = 450'))
    fed = load_federation(fed_path)
    agent = SiteAgent(sites / "riverside", fed, seed=0)
    assert agent.offer(round_id=0, global_blocks={}, secure=True).contribution.weight == 500


def test_metrics_json_holds_no_patient_count(tiny_sites_with_data, tmp_path):
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    result = simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0, secure=False)
    text = result.metrics_path.read_text()
    for key in ("n_train", "n_heldout", '"n"'):
        assert key not in text


# -- 6. A contribution refused only after everyone paid -----------------------------------------


def test_oversized_declared_weight_is_refused_before_any_training(tiny_sites_with_data, tmp_path):
    """Attack (denial of service): one site with a weight above ``max_weight`` aborted every
    site's round after all of them had reserved epsilon. The bound is now checked when the
    federation file is read, before anyone trains."""
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    fed_path = sites / "federation.toml"
    fed_path.write_text(fed_path.read_text().replace('scheme = "equal"', 'scheme = "declared"\n\n[weighting.sites]\n'
                                                     'riverside = 20000\nst-mary = 450'))
    with pytest.raises(PolicyError, match=r"weighting\.sites\.riverside.*at most 10000"):
        simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0)
    assert not any((sites / s / "state" / "ledger.json").exists() for s in ("st-mary", "riverside"))


def test_site_without_a_public_weight_declines_before_reserving_budget(tiny_sites_with_data, tmp_path):
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    fed_path = sites / "federation.toml"
    fed_path.write_text(fed_path.read_text().replace(
        'scheme = "equal"', 'scheme = "declared"\n\n[weighting.sites]\nst-mary = 450\nnorthgate = 450\n'
                            'lakeside = 450'))
    result = simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0, secure=False)
    doc = json.loads(result.metrics_path.read_text())
    river = [r for r in doc["metrics"] if r["site"] == "riverside"]
    assert river and all(r["declined"] == "policy" for r in river)
    assert _ledger(sites, "riverside").entries == []
    declined = [r for r in _records(sites / "riverside") if r["event"] == "round_declined"]
    assert "no public weight" in declined[0]["details"]["reason"]
    assert all(_ledger(sites, s).entries for s in ("st-mary", "northgate", "lakeside"))


# -- Metrics leave only through the egress guard --------------------------------------------------


def test_metrics_table_is_built_only_from_what_sites_released(tiny_sites_with_data, tmp_path):
    """A site whose policy keeps metrics in appears in metrics.json without a single number;
    every reported number equals the bytes the site wrote to its audit log before sending."""
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    conservative = sites.parent / "policies" / "conservative.toml"  # lakeside's
    conservative.write_text(conservative.read_text().replace("metrics = true", "metrics = false"))
    result = simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0, secure=False)
    doc = json.loads(result.metrics_path.read_text())
    assert not [r for r in doc["metrics"] if r["site"] == "lakeside"]
    assert not [r for r in _records(sites / "lakeside")
                if r["event"] == "egress" and r["details"]["message_type"] == "report"]
    for site_id in ("st-mary", "riverside"):
        reports = [r for r in _records(sites / site_id)
                   if r["event"] == "egress" and r["details"]["message_type"] == "report"]
        assert len(reports) == 1
        rows = [r for r in doc["metrics"] if r["site"] == site_id]
        payload = json.dumps({
            "type": "site-report", "version": 1, "site": site_id, "round": 0, "declined": None,
            "tasks": {row["task"]: {"accuracy": row["value"], "macro_f1": row["macro_f1"],
                                    "majority_class_rate": row["majority_class_rate"]} for row in rows},
            "epsilon_total": rows[0]["epsilon"], "epsilon_nominal": rows[0]["epsilon_nominal"],
        }, sort_keys=True, separators=(",", ":")).encode()
        assert hashlib.sha256(payload).hexdigest() == reports[0]["details"]["payload_sha256"]
        assert len(payload) == reports[0]["details"]["payload_bytes"]


def test_public_sampling_makes_the_round_plan_independent_of_the_patient_count():
    """With the federation's public sampling rate and steps, a site with one patient more
    runs exactly the same mechanism (rate, steps, noise, divisor): nothing in the accounted
    training depends on its count. Opacus's default (no public values) does depend on it."""
    from blossom_secure.site.policy import PrivacyTerms
    from blossom_secure.site.training import plan_round

    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=8.0,
                         noise_multiplier=None, target_epsilon_per_round=1.0)
    plans = [plan_round(n, batch_size=64, epochs=1, terms=terms, sample_rate=0.125, steps_per_round=8)
             for n in (448, 449)]
    assert plans[0] == plans[1] and plans[0].sampling == "public"
    default = [plan_round(n, batch_size=64, epochs=1, terms=terms) for n in (448, 449)]
    assert default[0].sample_rate != default[1].sample_rate and default[0].sampling == "training-set size"


def test_demo_federation_declares_public_sampling(tiny_sites_with_data, tmp_path):
    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0, secure=False)
    finished = [r for r in _records(sites / "riverside") if r["event"] == "training_finished"]
    assert [r["details"]["sampling"] for r in finished] == ["public"]
    assert [r["details"]["sample_rate"] for r in finished] == [0.34]


def test_budget_and_review_show_a_seeded_run_as_nominal(tiny_sites_with_data, tmp_path):
    """The operator's commands must not present a seeded simulation's epsilon as a guarantee."""
    from tests.test_cli import cli

    sites = _copy(tiny_sites_with_data, tmp_path / "x")
    simulate(sites_root=sites, rounds=1, out_dir=tmp_path / "out", seed=0, secure=False)
    budget = cli("blossom-site", "budget", str(sites / "riverside"))
    assert budget.returncode == 0, budget.stderr
    assert "seeded simulation: epsilon NOMINAL" in budget.stdout and "not a privacy guarantee" in budget.stdout
    html = tmp_path / "review.html"
    review = cli("blossom-site", "audit", "review", str(sites / "riverside"), "--html", str(html))
    assert review.returncode == 0, review.stderr
    assert "(nominal)" in review.stdout and "not a privacy guarantee" in review.stdout
    assert "epsilon is NOMINAL" in html.read_text()
    # and an unseeded run says the opposite
    other = _copy(tiny_sites_with_data, tmp_path / "y")
    simulate(sites_root=other, rounds=1, out_dir=tmp_path / "out2", seed=None, secure=False)
    budget = cli("blossom-site", "budget", str(other / "riverside"))
    assert "OS CSPRNG" in budget.stdout and "NOMINAL" not in budget.stdout


def test_site_outside_a_declared_group_keeps_that_block_and_spends_nothing_for_it(tiny_sites_with_data, tmp_path):
    """A block whose public group leaves this site out is never offered: decided from the
    files before training, so the protocol never has to refuse the site after it paid."""
    sites = _copy(tiny_sites_with_data, tmp_path / "x", plaintext=False)
    fed_path = sites / "federation.toml"
    fed_path.write_text(fed_path.read_text().replace('"fusion" = ["st-mary", "northgate", "riverside"]',
                                                     '"fusion" = ["st-mary", "northgate"]')
                        .replace('"fusion" = 2', '"fusion" = 2'))
    fed = load_federation(fed_path)
    agent = SiteAgent(sites / "riverside", fed, seed=0)
    assert "fusion" not in agent.shared_blocks and "encoder.tabular" in agent.shared_blocks
    from blossom_secure.coordinator.rounds import initial_global_blocks

    offer = agent.offer(round_id=0, global_blocks=initial_global_blocks(fed, include_heads=False, seed=0),
                        secure=True)
    assert offer.declined is None
    assert "encoder.tabular" in offer.contribution.egress and "fusion" not in offer.contribution.egress
