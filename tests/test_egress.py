"""The egress guard: only policy-cleared, non-head blocks can ever be serialised."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blossom_secure.site.egress import encode_plain_update
from blossom_secure.site.egress import Egress, select_egress
from blossom_secure.site.policy import Policy, PrivacyTerms

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, max_grad_norm=1.0, epsilon_budget=8.0,
                     noise_multiplier=1.0, target_epsilon_per_round=None)


def make_policy(shareable) -> Policy:
    return Policy(path=None, sha256="0" * 64, federation="f", coordinators=("embedded",),
                  shareable=tuple(shareable), privacy=TERMS, secure_aggregation_required=True, min_contributors=2)


ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
block_names = st.one_of(
    ident.map(lambda s: f"encoder.{s}"),
    ident.map(lambda s: f"head.{s}"),
    st.just("fusion"),
    st.text(max_size=12),  # garbage names must be dropped too
)
shareable_entries = st.one_of(ident.map(lambda s: f"encoder.{s}"), st.just("encoder.*"), st.just("fusion"),
                              st.just("encoder.i*"))


@settings(max_examples=300, deadline=None)
@given(blocks=st.dictionaries(block_names, st.integers(1, 5), max_size=8),
       shareable=st.lists(shareable_entries, max_size=4, unique=True))
def test_nothing_but_shareable_non_head_blocks_leaves(blocks, shareable):
    policy = make_policy(shareable)
    params = {name: np.full(n, 1.5, dtype=np.float32) for name, n in blocks.items()}
    egress = select_egress(policy, params)
    for name in egress:
        assert not name.startswith("head")
        assert policy.is_shareable(name)
        assert name in blocks
    # and everything the policy does allow is there (default deny, not default drop-all)
    assert set(egress) == {n for n in blocks if policy.is_shareable(n)}
    # every serialisation path is fed only from the Egress
    for name in egress:
        payload = encode_plain_update(federation_id="f", round_id=0, site_id="s", block=name, egress=egress, weight=3)
        assert payload.endswith(params[name].astype("<f4").tobytes())


@settings(max_examples=100, deadline=None)
@given(task=ident)
def test_head_never_leaves_even_if_policy_object_claims_it(task):
    # A Policy built by hand (bypassing the loader's check) that lists heads still cannot
    # release them: the guard drops heads unconditionally.
    policy = make_policy([f"head.{task}", "head.*", "*"])
    egress = select_egress(policy, {f"head.{task}": np.ones(3), "fusion": np.ones(2)})
    assert f"head.{task}" not in egress
    assert "fusion" in egress  # "*" matches fusion; allowed since it is not a head


def test_plain_dict_cannot_be_serialised():
    with pytest.raises(TypeError, match="only an Egress"):
        encode_plain_update(federation_id="f", round_id=0, site_id="s", block="head.x",
                            egress={"head.x": np.ones(2, np.float32)}, weight=1)


def test_egress_cannot_be_constructed_directly():
    with pytest.raises(TypeError, match="select_egress"):
        Egress({"head.x": np.ones(2)}, "0" * 64)


def test_egress_holds_read_only_copies():
    source = np.zeros(4, dtype=np.float32)
    egress = select_egress(make_policy(["fusion"]), {"fusion": source})
    source[:] = 7
    assert np.all(egress["fusion"] == 0)
    with pytest.raises(ValueError):
        egress["fusion"][0] = 1


def test_report_stays_in_unless_the_policy_lets_metrics_leave():
    from dataclasses import replace

    from blossom_secure.site.egress import SiteReport, select_report

    args = dict(site_id="s", round_id=3, declined=None, tasks={"t": {"accuracy": 0.5, "macro_f1": 0.4, "n": 17}},
                majority_class_rate={"t": 0.6}, epsilon_total=1.25, epsilon_nominal=False)
    assert select_report(make_policy(["fusion"]), **args) is None  # default deny
    report = select_report(replace(make_policy(["fusion"]), metrics_may_leave=True), **args)
    assert isinstance(report, SiteReport)
    import json

    doc = json.loads(report.payload)
    assert doc["tasks"] == {"t": {"accuracy": 0.5, "macro_f1": 0.4, "majority_class_rate": 0.6}}
    assert "17" not in report.payload.decode()  # a count handed in never leaves
    with pytest.raises(TypeError):
        SiteReport(b"{}", "0" * 64)
