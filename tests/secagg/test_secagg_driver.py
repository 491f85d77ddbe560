"""The in-process driver (the integration API), the stage-machine arguments, and the
layering rules of the core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from secagg_harness import FEDERATION, FEDERATION_SHA256, Federation, make_keys, update_for

import blossom_secure.secagg as secagg
from blossom_secure import crypto
from blossom_secure.secagg import (
    BlockResult,
    CoordinatorStageMachine,
    SecAggParams,
    SecAggResult,
    SiteContribution,
    SiteStageMachine,
    run_secure_aggregation,
)
from blossom_secure.secagg.messages import decode_site_message

SIZES = {"encoder.image": 8, "encoder.tabular": 4, "fusion": 3}
SITES = ["alpha", "beta", "gamma", "delta"]
KEYS, ROSTER = make_keys(SITES)
PARAMS = SecAggParams(max_weight=500, max_group_size=4)  # t = 3 (the default for four sites)


def contributions(blocks_by_site: dict[str, tuple[str, ...]] | None = None) -> dict[str, SiteContribution]:
    blocks_by_site = blocks_by_site or {s: tuple(SIZES) for s in SITES}
    return {
        site: SiteContribution(blocks={b: update_for(site, b, SIZES[b]) for b in blocks}, weight=10 * (i + 1))
        for i, (site, blocks) in enumerate(sorted(blocks_by_site.items()))
    }


def run(**overrides: object) -> SecAggResult:
    arguments = dict(
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=2,
        roster=ROSTER,
        identity_keys=KEYS,
        contributions=contributions(),
        block_sizes=SIZES,
        params=PARAMS,
    )
    arguments.update(overrides)
    return run_secure_aggregation(**arguments)


def test_weighted_mean_of_clipped_updates_within_bound() -> None:
    given = contributions()
    result = run(contributions=given)
    assert result.round_id == 2 and result.dropped == () and dict(result.site_errors) == {}
    for block, outcome in result.blocks.items():
        assert isinstance(outcome, BlockResult) and outcome.failure is None
        assert outcome.contributors == tuple(sorted(SITES))
        total_weight = sum(c.weight for c in given.values())
        assert outcome.weight_sum == total_weight
        exact = sum(
            c.weight * np.clip(c.blocks[block].astype(np.float64), -PARAMS.clip, PARAMS.clip) for c in given.values()
        )
        assert np.max(np.abs(outcome.weighted_sum - exact)) <= total_weight * 2.0 ** -(PARAMS.scale_bits + 1)
        assert outcome.weighted_sum.dtype == np.float64


def test_task_heads_in_the_layout_are_never_aggregated() -> None:
    result = run(block_sizes={**SIZES, "head.mortality": 5})
    assert result.blocks["head.mortality"].failure == "not shareable: task heads never leave a site"
    assert result.blocks["fusion"].failure is None


def test_every_layout_block_has_a_result() -> None:
    result = run(contributions=contributions({"alpha": ("fusion",), "beta": ("fusion",), "gamma": ("fusion",)}))
    assert set(result.blocks) == set(SIZES)
    assert result.blocks["fusion"].failure is None
    assert result.blocks["encoder.image"].failure.startswith("fewer than min_contributors")


def test_group_smaller_than_the_public_threshold_is_refused() -> None:
    """Two holders meet min_contributors (2) but not t = 3: the block is not aggregated."""
    result = run(contributions=contributions({"alpha": ("fusion",), "beta": ("fusion",)}))
    assert result.blocks["fusion"].failure.startswith("fewer than t")
    assert result.blocks["fusion"].weighted_sum is None


def test_egress_hook_sees_every_message_before_delivery() -> None:
    seen: list[tuple[str, str, tuple[str, ...], bytes]] = []
    result = run(on_egress=lambda *record: seen.append(record))
    assert result.dropped == ()
    assert len(seen) == 5 * len(SITES)
    kinds = [kind for _, kind, _, _ in seen]
    assert (
        kinds
        == ["secagg.advertise_keys"] * 4
        + ["secagg.share_keys"] * 4
        + ["secagg.masked_input"] * 4
        + ["secagg.consistency"] * 4
        + ["secagg.unmask"] * 4
    )
    for site, _kind, blocks, payload in seen:
        message = decode_site_message(
            payload,
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=2,
            roster=ROSTER,
            max_bytes=PARAMS.max_message_bytes,
        )
        assert message.site_id == site
        assert blocks == tuple(sorted(SIZES))


def test_egress_hook_failure_drops_the_site_and_is_recorded() -> None:
    def hook(site: str, kind: str, blocks: tuple[str, ...], payload: bytes) -> None:
        if site == "beta" and kind == "secagg.masked_input":
            raise OSError("audit log disk full")

    given = contributions()
    result = run(contributions=given, on_egress=hook)
    assert result.dropped == ("beta",)
    assert "OSError: audit log disk full" in result.site_errors["beta"]
    outcome = result.blocks["fusion"]
    assert outcome.contributors == ("alpha", "delta", "gamma")
    assert outcome.weight_sum == sum(given[s].weight for s in outcome.contributors)


def test_egress_hook_failure_before_advertising_keeps_the_site_out() -> None:
    def hook(site: str, kind: str, blocks: tuple[str, ...], payload: bytes) -> None:
        if site == "gamma":
            raise RuntimeError("refused")

    result = run(on_egress=hook)
    assert result.dropped == ("gamma",) and "RuntimeError: refused" in result.site_errors["gamma"]
    assert result.blocks["fusion"].contributors == ("alpha", "beta", "delta")


def test_one_site_failing_in_masked_input_does_not_abort_the_round() -> None:
    """A ValueError from one site's own machine (here: its update turns to NaN before it
    masks it) stops that site only; it counts as dropped and the others' sum comes out."""
    given = contributions()

    def spoil(site: str, kind: str, blocks: tuple[str, ...], payload: bytes) -> None:
        if site == "beta" and kind == "secagg.share_keys":
            given["beta"].blocks["fusion"][0] = np.nan  # the site's own data goes bad mid-round

    result = run(contributions=given, on_egress=spoil)
    assert result.dropped == ("beta",)
    assert result.site_errors["beta"].startswith("masked_input: ValueError")
    outcome = result.blocks["fusion"]
    assert outcome.failure is None and outcome.contributors == ("alpha", "delta", "gamma")
    assert outcome.weight_sum == sum(given[s].weight for s in outcome.contributors)


def test_any_exception_from_a_site_machine_stops_only_that_site(monkeypatch: pytest.MonkeyPatch) -> None:
    original = SiteStageMachine.consistency_check

    def broken(self: SiteStageMachine, request: bytes) -> bytes:
        if self.site_id == "gamma":
            raise RuntimeError("disk full")
        return original(self, request)

    monkeypatch.setattr(SiteStageMachine, "consistency_check", broken)
    result = run()
    assert result.dropped == ("gamma",)
    assert result.site_errors["gamma"] == "consistency: RuntimeError: disk full"
    assert result.blocks["fusion"].contributors == tuple(sorted(SITES))  # gamma's input was in before it failed


@pytest.mark.parametrize("point", secagg.DROP_POINTS)
def test_drop_after_each_stage(point: str) -> None:
    result = run(drop_after={"delta": point})
    assert dict(result.site_errors) == {}
    expected_in_sum = point in ("masked_input", "consistency", "unmask")
    assert result.dropped == (() if point == "unmask" else ("delta",))
    assert ("delta" in result.blocks["fusion"].contributors) is expected_in_sum
    assert result.blocks["fusion"].failure is None


def test_too_many_dropouts_fail_cleanly_and_the_round_goes_on() -> None:
    result = run(drop_after={"alpha": "advertise_keys", "beta": "share_keys", "gamma": "masked_input"})
    for outcome in result.blocks.values():
        assert outcome.weighted_sum is None and outcome.weight_sum is None and outcome.contributors == ()
        assert outcome.failure
    assert result.dropped == ("alpha", "beta", "gamma")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"drop_after": {"alpha": "lunch"}}, "drop_after"),
        ({"drop_after": {"zeta": "start"}}, "does not contribute"),
        ({"identity_keys": {s: k for s, k in KEYS.items() if s != "beta"}}, "no identity key"),
        ({"identity_keys": {**KEYS, "beta": KEYS["alpha"]}}, "does not match the roster"),
        ({"block_sizes": {**SIZES, "Head": 3}}, "block name"),
        ({"block_sizes": {"fusion": 3}}, "not in the federation layout"),
        ({"block_sizes": {**SIZES, "fusion": 4}}, "layout says"),
        ({"roster": {}}, "roster"),
        ({"roster": {**ROSTER, "bad id": ROSTER["alpha"]}}, "identifier"),
        ({"roster": {"alpha": ROSTER["alpha"], "st-mary\n": ROSTER["beta"]}}, "identifier"),
        ({"roster": {**ROSTER, **make_keys(["epsilon"])[1]}}, "max_group_size"),
        ({"federation_sha256": b"\x00" * 31}, "federation_sha256"),
        ({"federation_id": "no spaces"}, "federation_id"),
        ({"round_id": -1}, "round_id"),
        ({"params": SecAggParams(max_weight=10, max_group_size=10)}, "weight"),
        ({"params": SecAggParams(max_weight=500, max_group_size=3)}, "max_group_size"),
    ],
)
def test_inconsistent_arguments_raise_value_error(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(**overrides)


def test_contributor_outside_the_roster_refused() -> None:
    keys, roster = make_keys(["alpha", "beta"])
    with pytest.raises(ValueError, match="not in the roster"):
        run(roster=roster, identity_keys={**KEYS, **keys})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"blocks": {"head.mortality": np.zeros(2, np.float32)}, "weight": 1}, ValueError),
        ({"blocks": {"fusion": np.array([np.nan], np.float32)}, "weight": 1}, ValueError),
        ({"blocks": {"fusion": np.zeros(2, np.float64)}, "weight": 1}, TypeError),
        ({"blocks": {"fusion": np.zeros(2, np.float32)}, "weight": 0}, ValueError),
        ({"blocks": {"fusion": np.zeros(2, np.float32)}, "weight": 1, "min_contributors": 0}, ValueError),
        ({"blocks": [("fusion", np.zeros(2, np.float32))], "weight": 1}, TypeError),
    ],
)
def test_bad_contributions_refused(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        SiteContribution(**kwargs)


def test_contribution_mapping_is_frozen() -> None:
    source = {"fusion": np.zeros(2, np.float32)}
    contribution = SiteContribution(blocks=source, weight=1)
    source["encoder.image"] = np.zeros(2, np.float32)
    assert set(contribution.blocks) == {"fusion"}
    with pytest.raises(TypeError):
        contribution.blocks["x"] = np.zeros(1, np.float32)  # type: ignore[index]


def test_coordinator_refuses_a_layout_larger_than_the_message_limit() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        CoordinatorStageMachine(
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=1,
            roster=ROSTER,
            block_sizes={"fusion": 10_000},
            params=SecAggParams(max_message_bytes=8192),
        )


def test_coordinator_results_only_after_the_round() -> None:
    federation = Federation()
    with pytest.raises(RuntimeError):
        federation.coordinator.results()
    federation.run()
    assert federation.coordinator.stage == "done"
    with pytest.raises(RuntimeError):
        federation.coordinator.close_stage()
    assert federation.coordinator.unmask_responders == ("s0", "s1", "s2", "s3")


def test_stage_names_progress() -> None:
    federation = Federation()
    site = federation.sites["s0"]
    assert site.stage == "new" and federation.coordinator.stage == "advertise_keys"
    federation.advertise()
    assert site.stage == "advertise_keys" and federation.coordinator.stage == "share_keys"
    federation.share()
    federation.mask()
    assert site.stage == "masked_input" and federation.coordinator.stage == "consistency"
    federation.check()
    assert site.stage == "consistency" and federation.coordinator.stage == "unmask"
    federation.unmask()
    assert site.stage == "unmask"


def test_site_machine_refuses_a_roster_key_that_is_not_its_own() -> None:
    with pytest.raises(ValueError, match="does not match"):
        SiteStageMachine(
            site_id="alpha",
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=1,
            roster=ROSTER,
            identity_key=crypto.generate_identity_key(),
            block_sizes=SIZES,
            params=PARAMS,
            contribution=contributions()["alpha"],
        )


def test_public_api_is_exported() -> None:
    for name in ("run_secure_aggregation", "SecAggParams", "SiteContribution", "BlockResult", "SecAggResult"):
        assert name in secagg.__all__
    from blossom_secure.secagg.driver import BlockResult as DriverBlockResult
    from blossom_secure.secagg.driver import SecAggParams as DriverParams

    assert DriverBlockResult is BlockResult and DriverParams is SecAggParams


# ----------------------------------------------------------------- layering

CORE = Path(secagg.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_torch_network_files_pickle_or_weak_randomness(path: Path) -> None:
    forbidden = (
        "cryptography",
        "torch",
        "socket",
        "pickle",
        "random",
        "urllib",
        "http",
        "pathlib",
        "io",
        "shelve",
        "marshal",
    )
    for module in imported_modules(path):
        assert module.split(".")[0] not in forbidden, f"{path.name} imports {module}"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Assert), f"{path.name} uses assert"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", f"{path.name} opens files"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            assert not (
                node.value.attr == "random" and getattr(node.value.value, "id", "") == "np"
            ), f"{path.name} uses numpy.random"


def test_importing_the_core_loads_no_torch() -> None:
    code = "import sys, blossom_secure.secagg; print('torch' in sys.modules, 'socket' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()  # noqa: S603
    assert output[0] == "False"


def test_logs_carry_no_keys_seeds_or_values(caplog: pytest.LogCaptureFixture) -> None:
    import re

    caplog.set_level("DEBUG", logger="blossom_secure")
    run(drop_after={"beta": "share_keys"})
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage()
        assert not re.search(r"[0-9a-f]{32}", text) and "b'" not in text and "array(" not in text


def test_coordinator_with_an_unmask_executor_gives_the_same_sums() -> None:
    from concurrent.futures import ThreadPoolExecutor

    sizes = {"fusion": 200_000}
    with ThreadPoolExecutor(max_workers=2) as executor:
        federation = Federation({s: ("fusion",) for s in ("s0", "s1", "s2", "s3")}, sizes=sizes)
        twin = federation.new_coordinator(unmask_executor=executor, unmask_parts=3)
        federation.advertise()
        for message in federation.adverts.values():
            twin.receive(message)
        assert twin.close_stage() == federation.bundles
        federation.share()
        for message in federation.shares.values():
            twin.receive(message)
        twin.close_stage()
        federation.mask(skip=("s3",))
        for message in federation.masked.values():
            twin.receive(message)
        twin.close_stage()
        federation.check()
        for message in federation.signatures.values():
            twin.receive(message)
        twin.close_stage()
        federation.unmask()
        for message in federation.responses.values():
            twin.receive(message)
        twin.close_stage()
    expected = federation.coordinator.results()["fusion"]
    assert expected.failure is None
    assert np.array_equal(twin.results()["fusion"].weighted_sum, expected.weighted_sum)
    with pytest.raises(ValueError, match="unmask_parts"):
        federation.new_coordinator(unmask_parts=0)


# ---------------------------------------------------- public block groups


def _exclusive_split(params: SecAggParams, drop_after: dict[str, str] | None = None) -> tuple[SecAggResult, dict]:
    """The BLOSSOM "exclusive" split: ten sites, encoder.image held by h0-h4,
    encoder.tabular by h5-h9, fusion by all."""
    sites = [f"h{i}" for i in range(10)]
    keys, roster = make_keys(sites)
    blocks = {s: ("encoder.image" if i < 5 else "encoder.tabular", "fusion") for i, s in enumerate(sites)}
    given = {
        site: SiteContribution(blocks={b: update_for(site, b, SIZES[b]) for b in held}, weight=1 + i)
        for i, (site, held) in enumerate(sorted(blocks.items()))
    }
    result = run_secure_aggregation(
        federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=3, roster=roster,
        identity_keys=keys, contributions=given, block_sizes=SIZES, params=params, drop_after=drop_after,
    )
    return result, given


def test_block_held_by_half_the_sites_aggregates_with_a_declared_group() -> None:
    """Against max_sites = 10 a block needs t >= 6 > its 5 holders and is never aggregated;
    with its public group declared, t_b = floor(2 * 5 / 3) + 1 = 4 of 5, and it is, even
    with one holder dropped after sharing keys."""
    groups = {"encoder.image": ("h0", "h1", "h2", "h3", "h4"), "encoder.tabular": ("h5", "h6", "h7", "h8", "h9")}
    without = SecAggParams(max_weight=100, max_group_size=10)
    result, _ = _exclusive_split(without)
    assert result.blocks["encoder.image"].weighted_sum is None
    assert "fewer than t" in result.blocks["encoder.image"].failure
    assert result.blocks["fusion"].failure is None
    params = SecAggParams(max_weight=100, max_group_size=10, block_groups=groups)
    assert params.block_threshold("encoder.image") == 4 and params.block_threshold("fusion") == 7
    result, given = _exclusive_split(params, drop_after={"h2": "share_keys"})
    assert dict(result.site_errors) == {}
    for block, members in groups.items():
        expected = tuple(s for s in members if s != "h2")
        outcome = result.blocks[block]
        assert outcome.failure is None and outcome.contributors == expected
        scale = 2.0**params.scale_bits
        exact = sum(given[s].weight * np.rint(np.clip(given[s].blocks[block], -1, 1).astype(np.float64) * scale)
                    for s in expected) / scale
        assert np.array_equal(outcome.weighted_sum, exact)
        assert outcome.weight_sum == sum(given[s].weight for s in expected)
    assert result.blocks["fusion"].contributors == tuple(f"h{i}" for i in range(10) if i != 2)


def test_site_outside_a_declared_group_cannot_contribute_the_block() -> None:
    """The stage machine refuses, before advertising anything, to contribute a block whose
    public group does not hold the site (whatever its caller asks)."""
    params = SecAggParams(max_weight=500, max_group_size=4, block_groups={"fusion": ("alpha", "beta", "gamma")},
                          block_thresholds={"fusion": 2})
    with pytest.raises(ValueError, match="not in the public group of block fusion"):
        SiteStageMachine(
            site_id="delta", federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=1,
            roster=ROSTER, identity_key=KEYS["delta"], block_sizes=SIZES, params=params,
            contribution=contributions()["delta"],
        )
    with pytest.raises(ValueError, match="not in the public group"):
        run(params=params)
    result = run(params=params, contributions=contributions({s: ("fusion",) for s in SITES[:3]}))
    assert result.blocks["fusion"].contributors == ("alpha", "beta", "gamma")
