"""Blocks, fusion with missing modalities, and DP training on every block."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from blossom_secure.config import FeatureScale, ImageConfig, ModelLayout, TabularConfig
from blossom_secure.site.dp_random import DPRandomness
from blossom_secure.model import BlockModel, Fusion
from blossom_secure.site.policy import PrivacyTerms
from blossom_secure.site.training import SiteTensors, evaluate, plan_round, train_dp


def layout(spatial_dims: int = 2, arch: str = "cnn", norm: str = "group") -> ModelLayout:
    size = (16,) * spatial_dims
    return ModelLayout(embedding_dim=8,
                       image=ImageConfig(spatial_dims=spatial_dims, size=size, window=None, architecture=arch,
                                         channels=(4, 8), norm=norm),
                       tabular=TabularConfig(features=("a", "b", "c"), hidden=(8,),
                                             scaling=(FeatureScale(low=-3.0, high=3.0, centre=0.0, scale=1.0),) * 3),
                       tasks={"malignancy": 2, "severity": 3})


def test_site_builds_only_its_blocks():
    m = BlockModel(layout(), ("tabular",), ("severity",))
    assert list(m.blocks()) == ["encoder.tabular", "fusion", "head.severity"]
    m = BlockModel(layout(), ("image", "tabular"), ("severity", "malignancy"))
    assert list(m.blocks()) == ["encoder.image", "encoder.tabular", "fusion", "head.malignancy", "head.severity"]


def test_same_block_same_shape_at_every_site():
    a = BlockModel(layout(), ("image", "tabular"), ("malignancy",)).block_sizes()
    b = BlockModel(layout(), ("image",), ("severity",)).block_sizes()
    assert a["encoder.image"] == b["encoder.image"] and a["fusion"] == b["fusion"]


def test_block_vector_round_trip_and_size_check():
    m = BlockModel(layout(), ("image", "tabular"), ("malignancy",))
    v = m.get_block("fusion")
    m.set_block("fusion", v + 1)
    assert np.allclose(m.get_block("fusion"), v + 1)
    with pytest.raises(ValueError):
        m.set_block("fusion", np.zeros(v.size + 1, np.float32))
    with pytest.raises(ValueError):
        m.set_blocks({"head.severity": np.zeros(3)})


def test_fusion_ignores_absent_modality_values():
    torch.manual_seed(0)
    fusion = Fusion(4)
    img = torch.randn(3, 4)
    tab = torch.randn(3, 4)
    img_present = torch.tensor([1.0, 1.0, 0.0])
    tab_present = torch.tensor([1.0, 0.0, 1.0])
    out = fusion([img, tab], [img_present, tab_present])
    # Changing the embedding of a modality a patient does not have changes nothing for them.
    out2 = fusion([img.clone().index_fill_(0, torch.tensor([2]), 99.0),
                   tab.clone().index_fill_(0, torch.tensor([1]), -99.0)], [img_present, tab_present])
    assert torch.allclose(out, out2)
    # A patient with one modality gets exactly that modality's embedding as the mean.
    only_img = fusion([img[1:2], tab[1:2]], [torch.ones(1), torch.zeros(1)])
    alone = fusion([img[1:2]], [torch.ones(1)])
    assert torch.allclose(only_img, alone)


def test_missing_modality_patient_is_still_used():
    torch.manual_seed(0)
    m = BlockModel(layout(), ("image", "tabular"), ("malignancy",))
    img = torch.randn(2, 1, 16, 16)
    tab = torch.randn(2, 3)
    logits = m(img, torch.tensor([0.0, 1.0]), tab, torch.tensor([1.0, 0.0]))["malignancy"]
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert m.encoders["tabular"].parameters().__next__().grad is not None


@pytest.mark.parametrize(("dims", "arch", "norm"), [(2, "cnn", "group"), (3, "cnn", "instance"), (2, "densenet121", "group")])
def test_dp_training_runs_on_every_block(dims, arch, norm):
    torch.manual_seed(0)
    lay = layout(dims, arch, norm)
    if arch == "densenet121":
        lay = ModelLayout(embedding_dim=8, image=ImageConfig(spatial_dims=2, size=(32, 32), window=None,
                                                             architecture=arch, channels=(8,), norm=norm),
                          tabular=lay.tabular, tasks=lay.tasks)
    rng = np.random.default_rng(0)
    n = 24
    arrays = SimpleNamespace(
        image=rng.random((n, 1, *lay.image.size)).astype(np.float32),
        image_present=rng.random(n) < 0.7,
        tabular=rng.normal(size=(n, 3)).astype(np.float32),
        tabular_present=rng.random(n) < 0.7,
        labels={"malignancy": rng.integers(0, 2, n), "severity": np.where(rng.random(n) < 0.3, -1, rng.integers(0, 3, n))},
    )
    data = SiteTensors.from_arrays(arrays, lay)
    m = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
    before = m.get_blocks()
    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=10.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    plan = plan_round(n, batch_size=8, epochs=1, terms=terms)
    result = train_dp(m, data, plan, max_grad_norm=1.0, learning_rate=0.1,
                      randomness=DPRandomness.seeded_simulation(1, site_id="s", round_id=0))
    assert result.steps == plan.steps == 3
    assert sum(s for _, _, s in result.history) == 3
    after = m.get_blocks()
    for name in before:  # every block was trained (noise reaches even zero-gradient blocks)
        assert not np.allclose(before[name], after[name]), name
    metrics = evaluate(m, data)
    assert set(metrics) == {"malignancy", "severity"}
    assert 0.0 <= metrics["malignancy"]["accuracy"] <= 1.0
    # the same seed gives the same result (simulations are reproducible)
    m2 = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
    m2.set_blocks(before)
    train_dp(m2, data, plan, max_grad_norm=1.0, learning_rate=0.1,
             randomness=DPRandomness.seeded_simulation(1, site_id="s", round_id=0))
    assert all(np.allclose(after[k], v) for k, v in m2.get_blocks().items())


def _one_column_layout(scale: FeatureScale) -> ModelLayout:
    base = layout()
    return ModelLayout(embedding_dim=8, image=base.image, tasks=base.tasks,
                       tabular=TabularConfig(features=("crp",), hidden=(8,), scaling=(scale,)))


def test_tabular_scaling_is_the_declared_public_one():
    lay = _one_column_layout(FeatureScale(low=0.0, high=10.0, centre=2.0, scale=4.0))
    arrays = SimpleNamespace(image=None, image_present=np.zeros(4, bool),
                             tabular=np.array([[2.0], [6.0], [100.0], [5.0]], np.float32),
                             tabular_present=np.array([True, True, True, False]), labels={"t": np.zeros(4, int)})
    data = SiteTensors.from_arrays(arrays, lay)
    assert data.tabular[:3, 0].tolist() == [0.0, 1.0, 2.0]  # 100 is clipped to the declared 10
    assert data.tabular[3, 0].item() == 0.0  # absent rows stay zero


def test_outlier_patient_does_not_change_other_patients_inputs():
    """Attack (review, section 2): one added patient with crp = 1e5 shifted the training-set
    mean and std, so every other patient's model input moved and a threshold on the released
    update told whether that patient was in the data. With declared public scaling, adding
    the patient leaves every other patient's input bit-identical."""
    lay = _one_column_layout(FeatureScale(low=0.0, high=400.0, centre=13.0, scale=17.0))
    rng = np.random.default_rng(4)
    values = rng.lognormal(np.log(8.0), 1.0, size=(50, 1)).astype(np.float32)

    def inputs(x: np.ndarray) -> torch.Tensor:
        arrays = SimpleNamespace(image=None, image_present=np.zeros(len(x), bool), tabular=x,
                                 tabular_present=np.ones(len(x), bool), labels={"t": np.zeros(len(x), int)})
        return SiteTensors.from_arrays(arrays, lay).tabular

    without = inputs(values)
    with_outlier = inputs(np.vstack([values, [[1e5]]]).astype(np.float32))
    assert torch.equal(with_outlier[:50], without)
    assert with_outlier[50, 0].item() == pytest.approx((400.0 - 13.0) / 17.0)  # clipped to the range


def test_empty_poisson_batches_are_stepped_and_accounted():
    # With 3 patients and batch size 1 each step samples each patient with rate 1/3:
    # about a third of the steps see an empty batch; they still count and add noise.
    torch.manual_seed(0)
    lay = layout()
    arrays = SimpleNamespace(image=None, image_present=np.zeros(3, bool),
                             tabular=np.ones((3, 3), np.float32), tabular_present=np.ones(3, bool),
                             labels={"severity": np.array([0, 1, 2])})
    data = SiteTensors.from_arrays(arrays, lay)
    m = BlockModel(lay, ("tabular",), ("severity",))
    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=10.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    plan = plan_round(3, batch_size=1, epochs=10, terms=terms)
    result = train_dp(m, data, plan, max_grad_norm=1.0, learning_rate=0.1,
                      randomness=DPRandomness.seeded_simulation(3, site_id="s", round_id=0))
    assert result.steps == 30 and sum(s for _, _, s in result.history) == 30
    assert all(np.isfinite(v).all() for v in m.get_blocks().values())


def test_physical_batches_take_the_same_dp_step():
    """A Poisson batch run in physical parts (less memory) is the same DP-SGD step as the
    whole batch: the same patients, clipping, noise and accounting, so the same model up to
    float rounding, and the same history for the ledger."""
    torch.manual_seed(0)
    lay = layout()
    rng = np.random.default_rng(1)
    n = 40
    arrays = SimpleNamespace(
        image=rng.random((n, 1, *lay.image.size)).astype(np.float32), image_present=rng.random(n) < 0.8,
        tabular=rng.normal(size=(n, 3)).astype(np.float32), tabular_present=rng.random(n) < 0.8,
        labels={"malignancy": rng.integers(0, 2, n), "severity": rng.integers(0, 3, n)},
    )
    data = SiteTensors.from_arrays(arrays, lay)
    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=10.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    plan = plan_round(n, batch_size=16, epochs=2, terms=terms)
    start = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity")).get_blocks()
    results, blocks = [], []
    for physical in (None, 5):
        m = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
        m.set_blocks(start)
        results.append(train_dp(m, data, plan, max_grad_norm=1.0, learning_rate=0.1, momentum=0.9,
                                randomness=DPRandomness.seeded_simulation(2, site_id="s", round_id=0),
                                max_physical_batch_size=physical))
        blocks.append(m.get_blocks())
    assert results[0].history == results[1].history and results[0].steps == results[1].steps == plan.steps
    assert abs(results[0].mean_loss - results[1].mean_loss) < 1e-5
    for name, whole in blocks[0].items():
        assert np.allclose(whole, blocks[1][name], atol=1e-5), name
        assert not np.allclose(whole, start[name]), name


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_physical_batch_size_must_be_a_positive_int(bad):
    lay = layout()
    m = BlockModel(lay, ("tabular",), ("severity",))
    arrays = SimpleNamespace(image=None, image_present=np.zeros(3, bool), tabular=np.ones((3, 3), np.float32),
                             tabular_present=np.ones(3, bool), labels={"severity": np.array([0, 1, 2])})
    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=10.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        train_dp(m, SiteTensors.from_arrays(arrays, lay), plan_round(3, batch_size=1, epochs=1, terms=terms),
                 max_grad_norm=1.0, learning_rate=0.1, max_physical_batch_size=bad,
                 randomness=DPRandomness.seeded_simulation(3, site_id="s", round_id=0))


@pytest.mark.slow
def test_federation_max_physical_batch_size_reaches_dp_training_and_leaves_epsilon_unchanged(
        tiny_sites_with_data, tmp_path, monkeypatch):
    """The federation file's ``training.max_physical_batch_size`` is what the site agent's
    DP training runs with, and it changes memory only: one round of a seeded site with
    physical parts of 2 patients spends the same epsilon, with the same ledger entry, and
    trains the same blocks (up to float rounding) as the round without it."""
    import shutil

    import blossom_secure.site.agent as site_agent
    from blossom_secure.config import load_federation

    real_train_dp = site_agent.train_dp
    received = []

    def recording_train_dp(*args, **kwargs):
        received.append(kwargs.get("max_physical_batch_size"))
        return real_train_dp(*args, **kwargs)

    monkeypatch.setattr(site_agent, "train_dp", recording_train_dp)
    runs = {}
    for name, line in (("whole", None), ("parts", "max_physical_batch_size = 2\n")):
        root = tmp_path / name
        shutil.copytree(tiny_sites_with_data.parent / "policies", root / "policies")
        shutil.copytree(tiny_sites_with_data, root / "sites")
        fed_path = root / "sites" / "federation.toml"
        if line is not None:
            text = fed_path.read_text()
            assert "# max_physical_batch_size = 8\n" in text
            fed_path.write_text(text.replace("# max_physical_batch_size = 8\n", line))
        fed = load_federation(fed_path)
        agent = site_agent.SiteAgent(root / "sites" / "st-mary", fed, seed=0)  # image and tabular
        assert agent.seeded_noise  # the same sampling and noise in both runs
        offer = agent.offer(round_id=0, global_blocks={}, secure=True)
        assert offer.declined is None
        runs[name] = (offer, agent.ledger.entries, agent.model.get_blocks())
    assert received == [None, 2]
    (whole, whole_entries, whole_blocks), (parts, parts_entries, parts_blocks) = runs["whole"], runs["parts"]
    assert parts.epsilon_total == whole.epsilon_total > 0
    assert [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps, e.epsilon_total) for e in parts_entries] == \
        [(e.round_id, e.noise_multiplier, e.sample_rate, e.steps, e.epsilon_total) for e in whole_entries]
    assert parts_blocks.keys() == whole_blocks.keys()
    for name, block in whole_blocks.items():
        assert np.allclose(parts_blocks[name], block, atol=1e-5), name


def _small_site(n: int = 32):
    lay = layout()
    rng = np.random.default_rng(5)
    arrays = SimpleNamespace(
        image=rng.random((n, 1, *lay.image.size)).astype(np.float32), image_present=rng.random(n) < 0.8,
        tabular=rng.normal(size=(n, 3)).astype(np.float32), tabular_present=rng.random(n) < 0.8,
        labels={"malignancy": rng.integers(0, 2, n), "severity": rng.integers(0, 3, n)},
    )
    terms = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=10.0,
                         noise_multiplier=1.0, target_epsilon_per_round=None)
    return lay, SiteTensors.from_arrays(arrays, lay), plan_round(n, batch_size=8, epochs=1, terms=terms)


def test_frozen_blocks_take_no_step_and_no_noise_while_the_rest_trains_with_the_same_accounting():
    """Fine-tuning (the study's FedAvg + FT): frozen encoders stay bit for bit, so no noise
    is spent on them; every other block trains; the steps Opacus accounts are the plan's,
    exactly as without freezing; and the model is trainable everywhere afterwards."""
    torch.manual_seed(0)
    lay, data, plan = _small_site()
    m = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
    before = m.get_blocks()
    frozen = ("encoder.image", "encoder.tabular")
    result = train_dp(m, data, plan, max_grad_norm=1.0, learning_rate=0.1, frozen=frozen,
                      randomness=DPRandomness.seeded_simulation(4, site_id="s", round_id=0))
    after = m.get_blocks()
    for name in before:
        if name in frozen:
            assert np.array_equal(before[name], after[name]), name
        else:
            assert not np.allclose(before[name], after[name]), name
    assert result.steps == plan.steps and sum(s for _, _, s in result.history) == plan.steps
    assert all(p.requires_grad for p in m.parameters())


def test_frozen_blocks_without_dp_stay_put_too():
    from blossom_secure.site.training import train_without_dp_simulation_only

    torch.manual_seed(0)
    lay, data, _ = _small_site()
    m = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
    before = m.get_blocks()
    train_without_dp_simulation_only(m, data, epochs=1, batch_size=8, learning_rate=0.1, momentum=0.9, seed=1,
                                     frozen=("encoder.image",))
    after = m.get_blocks()
    assert np.array_equal(before["encoder.image"], after["encoder.image"])
    assert not np.allclose(before["encoder.tabular"], after["encoder.tabular"])


@pytest.mark.parametrize(("frozen", "reason"), [(("encoder.nope",), "no such block"),
                                                (("encoder.image", "encoder.tabular", "fusion", "head.malignancy",
                                                  "head.severity"), "nothing to train")])
def test_freezing_an_unknown_block_or_every_block_is_refused(frozen, reason):
    lay, data, plan = _small_site()
    m = BlockModel(lay, ("image", "tabular"), ("malignancy", "severity"))
    with pytest.raises(ValueError, match=reason):
        train_dp(m, data, plan, max_grad_norm=1.0, learning_rate=0.1, frozen=frozen,
                 randomness=DPRandomness.seeded_simulation(4, site_id="s", round_id=0))
    assert all(p.requires_grad for p in m.parameters())


def test_macro_f1_averages_only_the_classes_present_at_the_site():
    """Labels 0, 0, 1 of a 3-class task, every prediction 0: F1 is 0.8 for class 0 and 0 for
    class 1; class 2, absent at the site, does not count (0.4, not 0.8 / 3)."""
    lay = layout()
    arrays = SimpleNamespace(image=None, image_present=np.zeros(3, bool), tabular=np.ones((3, 3), np.float32),
                             tabular_present=np.ones(3, bool), labels={"severity": np.array([0, 0, 1])})
    m = BlockModel(lay, ("tabular",), ("severity",))
    with torch.no_grad():
        m.heads["severity"].weight.zero_()
        m.heads["severity"].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    metrics = evaluate(m, SiteTensors.from_arrays(arrays, lay))["severity"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(0.4)
