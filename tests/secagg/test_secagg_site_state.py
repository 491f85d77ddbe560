"""Saving a site's stage machine between the stages of a round and restoring it in a
fresh object or process (Flower starts a ClientApp process for every message).

The property guarded: a restored site goes on exactly where it stopped (same sums as a
round without restarts), never answers a stage twice with different bytes, and refuses a
state that is not its own, for this round, under these terms, untouched.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, ROUND, Federation, make_keys

import blossom_secure.secagg as secagg
from blossom_secure import crypto
from blossom_secure._fs import save_arrays_npz
from blossom_secure.site.round_state import discard_round_state, load_round_state, round_state_path, save_round_state
from blossom_secure.secagg import (
    STAGE_NAMES,
    BothSharesRequestedError,
    ReplayedMessageError,
    SecAggParams,
    SiteContribution,
    SiteStageMachine,
    SiteStateError,
    StageAlreadyAnsweredError,
    StageOrderError,
)
from blossom_secure.secagg import site_state
from blossom_secure.secagg.messages import (
    CoordinatorMessage,
    decode_coordinator_message,
    encode_coordinator_message,
)
from blossom_secure.secagg.site_state import MAX_STATE_BYTES, STATE_STAGES, decode_site_state

SITES = ("s0", "s1", "s2", "s3")
KEYS = make_keys(list(SITES))  # one set of identities, so that every federation here has the same roster
STEPS = ("advertise", "share", "mask", "check", "unmask")
#: Boundaries at which a site can be restarted: before step i (0-4), or after the last (5).
BOUNDARIES = tuple(range(len(STEPS) + 1))
#: (site, step it skips) or None: a dropout, so that restored sites also reveal mask-key
#: shares (s3 gone before its masked input) and rebuild a late site's seed.
DROPS = (None, ("s3", "mask"), ("s3", "check"), ("s1", "unmask"))


def new_federation() -> Federation:
    return Federation(keys=KEYS)


def terms(federation: Federation, site: str) -> dict:
    """What a site takes from its own files (never from the state)."""
    return dict(
        site_id=site,
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=federation.round_id,
        roster=federation.roster,
        identity_key=federation.keys[site],
        block_sizes=federation.sizes,
        params=federation.params,
    )


def restore(federation: Federation, site: str, state: bytes, **overrides: object) -> SiteStageMachine:
    arguments = {**terms(federation, site), "contribution": federation.contributions[site], **overrides}
    return SiteStageMachine.from_state(state, **arguments)


def restart(
    federation: Federation, site: str, *, keep_contribution: bool = True, state_dir: Path | None = None
) -> None:
    """Export the site's machine, then replace it by a fresh one restored from the bytes
    (through the state file when ``state_dir`` is given)."""
    machine = federation.sites[site]
    state = machine.export_state()
    if state_dir is not None:
        save_round_state(state_dir, federation.round_id, state)
        state = load_round_state(state_dir, federation.round_id)
    needs_contribution = machine.stage in ("new", "advertise_keys", "share_keys")
    contribution = federation.contributions[site] if keep_contribution or needs_contribution else None
    restored = restore(federation, site, state, contribution=contribution)
    assert restored is not machine
    assert restored.stage == machine.stage and restored.site_id == site
    assert restored.last_message_blocks == machine.last_message_blocks
    assert restored.export_state() == state  # nothing lost or added on the way
    federation.sites[site] = restored


def run_round(
    federation: Federation,
    *,
    restarts: Mapping[str, Collection[int]] | None = None,
    drop: tuple[str, str] | None = None,
    keep_contribution: bool = True,
    state_dir: Path | None = None,
) -> dict:
    """One round through encoded messages and the coordinator; ``restarts[site]`` are the
    boundaries at which that site is restarted."""
    restarts = restarts or {}
    for index, step in enumerate(STEPS):
        for site in sorted(restarts):
            if index in restarts[site]:
                restart(federation, site, keep_contribution=keep_contribution, state_dir=state_dir)
        skip = (drop[0],) if drop is not None and drop[1] == step else ()
        getattr(federation, step)(skip=skip)
    for site in sorted(restarts):
        if len(STEPS) in restarts[site]:
            restart(federation, site, keep_contribution=keep_contribution, state_dir=state_dir)
    return federation.coordinator.results()


@functools.lru_cache(maxsize=None)
def uninterrupted(drop: tuple[str, str] | None) -> dict:
    return run_round(new_federation(), drop=drop)


def assert_same_sums(federation: Federation, results: Mapping, drop: tuple[str, str] | None) -> None:
    expected = uninterrupted(drop)
    assert set(results) == set(expected)
    assert results["encoder.image"].failure is None and results["fusion"].failure is None
    for block, outcome in results.items():
        reference = expected[block]
        assert outcome.failure == reference.failure
        if outcome.failure is not None:  # encoder.tabular: in the layout, contributed by no one
            continue
        assert outcome.contributors == reference.contributors
        assert outcome.weight_sum == reference.weight_sum
        assert np.array_equal(outcome.weighted_sum, reference.weighted_sum)
        assert np.array_equal(outcome.weighted_sum, federation.expected_sum(block, outcome.contributors))


def decode_for(federation: Federation, site: str, data: bytes) -> CoordinatorMessage:
    return decode_coordinator_message(
        data,
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=federation.round_id,
        recipient=site,
        max_bytes=federation.params.max_message_bytes,
    )


def recode(federation: Federation, site: str, data: bytes, **changes: object) -> bytes:
    """A coordinator message re-encoded with ``changes``: what a malicious coordinator sends."""
    return encode_coordinator_message(dataclasses.replace(decode_for(federation, site, data), **changes))


def edit(state: bytes, key: crypto.Ed25519PrivateKey, change: Callable[[dict], None]) -> bytes:
    """The state with ``change`` applied to its JSON, signed again with the site's own key
    (the worst case: a change the signature cannot catch)."""
    document = json.loads(state)
    change(document)
    return site_state._sign_document(document, key)


def at_stage(done: int, drop: tuple[str, str] | None = None) -> Federation:
    """A federation whose sites have done the first ``done`` steps."""
    federation = new_federation()
    for step in STEPS[:done]:
        skip = (drop[0],) if drop is not None and drop[1] == step else ()
        getattr(federation, step)(skip=skip)
    return federation


# ------------------------------------------------------------------ same sums


def test_state_stages_are_new_then_the_protocol_stages() -> None:
    assert STATE_STAGES == ("new", *STAGE_NAMES)


def test_every_site_restored_between_every_pair_of_stages_gives_the_same_sums() -> None:
    federation = new_federation()
    results = run_round(federation, restarts={site: BOUNDARIES for site in SITES})
    assert_same_sums(federation, results, None)


@pytest.mark.parametrize("boundary", BOUNDARIES[1:], ids=lambda b: f"after-{STAGE_NAMES[b - 1]}")
@pytest.mark.parametrize("drop", DROPS, ids=str)
def test_every_site_restored_after_one_stage_gives_the_same_sums(boundary: int, drop: tuple[str, str] | None) -> None:
    federation = new_federation()
    results = run_round(federation, restarts={site: (boundary,) for site in SITES}, drop=drop)
    assert_same_sums(federation, results, drop)


def test_sites_restored_without_their_contribution_after_masking_give_the_same_sums() -> None:
    federation = new_federation()
    results = run_round(federation, restarts={site: BOUNDARIES for site in SITES}, keep_contribution=False)
    assert_same_sums(federation, results, None)


def test_every_site_restored_through_its_state_file_gives_the_same_sums(tmp_path: Path) -> None:
    federation = new_federation()
    results = run_round(federation, restarts={site: BOUNDARIES for site in SITES}, state_dir=tmp_path / "state")
    assert_same_sums(federation, results, None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    restarts=st.dictionaries(st.sampled_from(SITES), st.frozensets(st.sampled_from(BOUNDARIES), min_size=1)),
    drop=st.sampled_from(DROPS),
    keep_contribution=st.booleans(),
)
def test_any_sites_restored_at_any_stages_give_the_same_sums(
    restarts: dict[str, frozenset[int]], drop: tuple[str, str] | None, keep_contribution: bool
) -> None:
    federation = new_federation()
    results = run_round(federation, restarts=restarts, drop=drop, keep_contribution=keep_contribution)
    assert_same_sums(federation, results, drop)


_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
from blossom_secure import crypto
from blossom_secure._fs import load_arrays_npz
from blossom_secure.site.round_state import load_round_state, save_round_state
from blossom_secure.secagg import SecAggParams, SiteContribution, SiteStageMachine

work, stage = Path(sys.argv[1]), sys.argv[2]
config = json.loads((work / "config.json").read_text())
terms = dict(
    site_id=config["site_id"], federation_id=config["federation_id"],
    federation_sha256=bytes.fromhex(config["federation_sha256"]), round_id=config["round_id"],
    roster={site: bytes.fromhex(key) for site, key in config["roster"].items()},
    identity_key=crypto.identity_key_from_pem((work / "identity.pem").read_bytes()),
    block_sizes=config["block_sizes"], params=SecAggParams(**config["params"]),
)
contribution = SiteContribution(
    blocks=load_arrays_npz(work / "contribution.npz"), weight=config["weight"],
    min_contributors=config["min_contributors"],
)
state = load_round_state(work / "state", config["round_id"])
if state is None:
    machine = SiteStageMachine(**terms, contribution=contribution)
else:
    machine = SiteStageMachine.from_state(state, **terms, contribution=contribution)
request = (work / "request.bin").read_bytes() if stage != "advertise_keys" else None
reply = {
    "advertise_keys": lambda: machine.advertise_keys(),
    "share_keys": lambda: machine.share_keys(request),
    "masked_input": lambda: machine.masked_input(request),
    "consistency": lambda: machine.consistency_check(request),
    "unmask": lambda: machine.unmask(request),
}[stage]()
save_round_state(work / "state", config["round_id"], machine.export_state())
(work / "reply.bin").write_bytes(reply)
"""


class ProcessPerMessageSite:
    """A site that answers every message in a new Python process, as a Flower ClientApp
    does, keeping nothing between messages but its state file."""

    def __init__(self, federation: Federation, site: str, work: Path) -> None:
        self.work = work
        contribution = federation.contributions[site]
        save_arrays_npz(work / "contribution.npz", dict(contribution.blocks))
        (work / "identity.pem").write_bytes(crypto.identity_key_to_pem(federation.keys[site]))
        config = {
            "site_id": site,
            "federation_id": FEDERATION,
            "federation_sha256": FEDERATION_SHA256.hex(),
            "round_id": federation.round_id,
            "roster": {s: key.hex() for s, key in federation.roster.items()},
            "block_sizes": federation.sizes,
            "params": {"max_weight": 100, "max_group_size": 5, "threshold": 3},
            "weight": contribution.weight,
            "min_contributors": contribution.min_contributors,
        }
        assert SecAggParams(**config["params"]) == federation.params
        (work / "config.json").write_text(json.dumps(config))

    def _answer(self, stage: str, request: bytes | None) -> bytes:
        if request is not None:
            (self.work / "request.bin").write_bytes(request)
        code = subprocess.run(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-c", _PROCESS_SCRIPT, str(self.work), stage], capture_output=True, text=True
        )
        assert code.returncode == 0, code.stderr
        return (self.work / "reply.bin").read_bytes()

    def advertise_keys(self) -> bytes:
        return self._answer("advertise_keys", None)

    def share_keys(self, request: bytes) -> bytes:
        return self._answer("share_keys", request)

    def masked_input(self, request: bytes) -> bytes:
        return self._answer("masked_input", request)

    def consistency_check(self, request: bytes) -> bytes:
        return self._answer("consistency", request)

    def unmask(self, request: bytes) -> bytes:
        return self._answer("unmask", request)


def test_a_site_answering_every_message_in_a_fresh_process_gives_the_same_sums(tmp_path: Path) -> None:
    federation = new_federation()
    federation.sites["s0"] = ProcessPerMessageSite(federation, "s0", tmp_path)  # type: ignore[assignment]
    results = run_round(federation, drop=("s3", "mask"))
    assert_same_sums(federation, results, ("s3", "mask"))
    state = load_round_state(tmp_path / "state", ROUND)
    assert state is not None and json.loads(state)["stage"] == "unmask"


# ------------------------------------------------------------ never two answers


def test_restarted_site_never_sends_a_second_masked_input() -> None:
    federation = at_stage(3)
    sent, delivery = federation.masked["s0"], federation.deliveries["s0"]
    state = federation.sites["s0"].export_state()
    contribution = federation.contributions["s0"]
    retrained = SiteContribution(
        blocks={block: update + np.float32(0.25) for block, update in contribution.blocks.items()},
        weight=contribution.weight,
        min_contributors=contribution.min_contributors,
    )
    with pytest.raises(SiteStateError, match="contribution differs"):
        restore(federation, "s0", state, contribution=retrained)
    restored = restore(federation, "s0", state)
    # A coordinator retrying with a delivery that leaves s3 out would get a vector masked
    # without s3's pairwise mask: its difference with the first one is that mask.
    shares = decode_for(federation, "s0", delivery).shares
    without_s3 = recode(
        federation, "s0", delivery, share_senders=("s0", "s1", "s2"), shares=tuple(s for s in shares if s.peer != "s3")
    )
    for request in (delivery, without_s3):
        with pytest.raises(ReplayedMessageError):
            restored.masked_input(request)
    with pytest.raises(ReplayedMessageError):
        restored.resend(without_s3)
    assert restored.resend(delivery) == sent  # the same bytes, or nothing
    with pytest.raises(StageAlreadyAnsweredError):
        restore(federation, "s0", state, contribution=None).resend(delivery)


def test_site_restarted_before_saving_its_masked_input_masks_the_same_update_or_none() -> None:
    """The process died after masking but before saving (so before sending): the site
    restarts from the state saved after share_keys, which pins its update."""
    federation = at_stage(2)
    delivery = federation.deliveries["s0"]
    state = federation.sites["s0"].export_state()
    lost = federation.sites["s0"].masked_input(delivery)
    assert restore(federation, "s0", state).masked_input(delivery) == lost
    contribution = federation.contributions["s0"]
    retrained = dataclasses.replace(contribution, blocks={b: -u for b, u in contribution.blocks.items()})
    with pytest.raises(SiteStateError, match="contribution differs"):
        restore(federation, "s0", state, contribution=retrained)
    with pytest.raises(ValueError, match="contribution is needed"):
        restore(federation, "s0", state, contribution=None)


def test_masked_input_rebuilt_from_a_changed_update_is_never_sent() -> None:
    federation = at_stage(3)
    machine = federation.sites["s0"]
    federation.contributions["s0"].blocks["fusion"][0] += np.float32(0.5)  # the caller's array changes in place
    with pytest.raises(StageAlreadyAnsweredError, match="differs"):
        machine.resend(federation.deliveries["s0"])


def test_restarted_site_never_answers_unmask_for_the_other_kind_of_share() -> None:
    """s3 dropped before its masked input: s0 revealed its mask-key share. A restarted s0
    asked to count s3 as a survivor (its seed share) refuses, whichever way it is asked."""
    federation = at_stage(5, drop=("s3", "mask"))
    request = federation.unmask_requests["s0"]
    restored = restore(federation, "s0", federation.sites["s0"].export_state(), contribution=None)
    other = recode(federation, "s0", request, survivors=SITES, dropped=())
    with pytest.raises(BothSharesRequestedError):
        restored.unmask(other)
    with pytest.raises(BothSharesRequestedError):
        restored.resend(other)
    with pytest.raises(ReplayedMessageError):
        restored.unmask(request)
    assert restored.resend(request) == federation.responses["s0"]


@pytest.mark.parametrize("restored", [False, True], ids=["in-memory", "restored"])
@pytest.mark.parametrize("done", range(1, 6), ids=lambda d: STAGE_NAMES[d - 1])
def test_resend_gives_the_bytes_sent_for_the_same_request_only(done: int, restored: bool) -> None:
    federation = at_stage(done)
    site = "s0"
    machine = federation.sites[site]
    if restored:
        machine = restore(federation, site, machine.export_state())
    complete = new_federation()  # requests of the stages not reached yet
    complete.run()
    requests: list[bytes | None] = [None]
    for name in ("bundles", "deliveries", "consistency_requests", "unmask_requests"):
        requests.append(getattr(federation, name).get(site) or getattr(complete, name)[site])
    sent = [federation.adverts, federation.shares, federation.masked, federation.signatures, federation.responses]
    assert machine.resend(requests[done - 1]) == sent[done - 1][site]
    for earlier in requests[: done - 1]:
        with pytest.raises(ReplayedMessageError):
            machine.resend(earlier)
    for later in requests[done:]:
        with pytest.raises(StageOrderError):
            machine.resend(later)
    if done > 1:  # another request for the stage answered: another key bundle or share delivery (fresh
        # keys), a consistency request naming one block only, an unmask request without signatures
        other = {
            2: complete.bundles[site],
            3: complete.deliveries[site],
            4: recode(federation, site, requests[3], blocks=decode_for(federation, site, requests[3]).blocks[:1]),
            5: recode(federation, site, requests[4], consistency=()),
        }[done]
        assert other != requests[done - 1]
        with pytest.raises(ReplayedMessageError):
            machine.resend(other)


def test_resend_before_anything_is_sent_refused() -> None:
    federation = new_federation()
    with pytest.raises(StageOrderError):
        restore(federation, "s0", federation.sites["s0"].export_state()).resend(None)


_METHODS = {
    "advertise": lambda machine, request: machine.advertise_keys(),
    "share": lambda machine, request: machine.share_keys(request),
    "mask": lambda machine, request: machine.masked_input(request),
    "check": lambda machine, request: machine.consistency_check(request),
    "unmask": lambda machine, request: machine.unmask(request),
}


def _outcome(call: Callable[[], bytes]) -> type | str:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)
    return "answered"


@pytest.mark.parametrize("done", range(6), ids=lambda d: STATE_STAGES[d])
def test_restored_machine_refuses_replays_and_reordering_like_the_in_memory_one(done: int) -> None:
    federation = at_stage(done)
    later = new_federation()  # a full round of the same federation: requests of every stage
    later.run()
    site = "s0"
    original = federation.sites[site]
    restored = restore(federation, site, original.export_state())
    own = [federation.bundles, federation.deliveries, federation.consistency_requests, federation.unmask_requests]
    theirs = [later.bundles, later.deliveries, later.consistency_requests, later.unmask_requests]
    probes = [None] + [r[site] for r in own if site in r] + [r[site] for r in theirs]
    next_step = STEPS[done] if done < len(STEPS) else None
    for step, method in _METHODS.items():
        if step == next_step:
            continue  # the next stage may be a valid answer, not a refusal
        for request in probes:
            expected = _outcome(lambda: method(original, request))  # noqa: B023 - called at once
            assert expected != "answered"
            assert _outcome(lambda: method(restored, request)) == expected  # noqa: B023


# --------------------------------------------------------- bound to its terms


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"site_id": "s1", "identity_key": KEYS[0]["s1"]}, SiteStateError, "belongs to site 's0'"),
        ({"identity_key": KEYS[0]["s1"]}, ValueError, "does not match the roster"),
        ({"round_id": ROUND + 1}, SiteStateError, "another round"),
        ({"federation_sha256": bytes(32)}, SiteStateError, "another federation"),
        ({"federation_id": "fed-other"}, SiteStateError, "another federation_id"),
        ({"roster": {**KEYS[1], "s4": crypto.identity_public_key(crypto.generate_identity_key())}}, SiteStateError,
         "another roster"),
        ({"params": SecAggParams(max_weight=100, max_group_size=5, threshold=4)}, SiteStateError, "another terms"),
        ({"block_sizes": {"encoder.image": 6, "encoder.tabular": 3, "fusion": 2, "encoder.x": 4}}, SiteStateError,
         "another terms"),
    ],
)
def test_state_of_another_site_round_or_federation_refused(overrides: dict, error: type, match: str) -> None:
    federation = at_stage(3)
    state = federation.sites["s0"].export_state()
    with pytest.raises(error, match=match):
        restore(federation, "s0", state, **overrides)


def test_site_state_error_is_a_value_error_and_a_blossom_error() -> None:
    from blossom_secure.errors import BlossomError

    assert issubclass(SiteStateError, ValueError) and issubclass(SiteStateError, BlossomError)
    assert issubclass(StageAlreadyAnsweredError, ReplayedMessageError)
    assert secagg.SiteStateError is SiteStateError


# ------------------------------------------------------------- tampered state


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("done", "change", "match"),
    [
        (2, _set("stage", "advertise_keys"), "shared must be null"),  # a rolled back stage
        (4, _set("stage", "masked_input"), "signed must be empty"),
        (5, _set("stage", "consistency"), "secrets must be present"),
        (2, _set("extra", 1), r"unknown field\(s\) in the state: extra"),
        (2, _set("secrets.blocks.0.extra", 1), r"unknown field\(s\) in secrets.blocks\[0\]"),
        (2, _set("version", 2), "version 2 is not supported"),
        (2, _set("secrets.blocks.0.seed", _b64(bytes(31))), "must be 32 bytes, not 31"),
        (2, _set("secrets.share_private_key", _b64(bytes(32))[:-1]), "not base64"),
        (2, _set("secrets.blocks.0.seed", _b64(os.urandom(32))), "does not match its commitment"),
        (2, _set("secrets.blocks.0.mask_private_key", _b64(os.urandom(32))), "mask private key of encoder.image"),
        (2, _set("secrets.share_private_key", _b64(os.urandom(32))), "share private key saved does not match"),
        (2, _set("shared.own_shares", []), "own shares saved do not cover"),
        (2, _set("shared.advertisements", []), "lacks this site's advertisement"),
        (3, _set("masked.held", []), "shares held do not match"),
        (3, _set("masked.mask_groups", []), "groups masked with differ"),
        (3, _set("masked.share_senders", ["s0", "s1", "s2", "s9"]), "did not advertise"),
        (4, _set("masked.signed.0.sites", ["s0", "s1", "s2"]), "consistency answer sent does not match"),
        (5, _set("revealed.0.kind", "mask_key"), "do not match the unmask answer"),
        (3, _set("sent.2.message", _b64(b"x")), "message must be null for the masked input"),
        (2, _set("sent.1.message", _b64(b"x")), "does not match its SHA-256"),
        (2, _set("round_id", 2**64), "integer in 0..2\\*\\*64-1|another round"),
        (2, _set("secrets.blocks.0.block", "head.mortality"), "not a shareable block"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_tampered_state_signed_again_refused(done: int, change: Callable[[dict], None], match: str) -> None:
    federation = at_stage(done)
    state = edit(federation.sites["s0"].export_state(), federation.keys["s0"], change)
    with pytest.raises(SiteStateError, match=match):
        restore(federation, "s0", state)


def test_state_changed_without_the_identity_key_refused() -> None:
    federation = at_stage(3)
    document = json.loads(federation.sites["s0"].export_state())
    document["stage"] = "share_keys"
    tampered = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SiteStateError, match="signature does not verify"):
        restore(federation, "s0", tampered)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda s: s[: len(s) // 2], "not ASCII JSON"),
        (lambda s: b"", "not ASCII JSON"),
        (lambda s: s + b"\n", "canonical"),
        (lambda s: s.replace(b'{"contribution_sha256"', b'{ "contribution_sha256"', 1), "canonical"),
        (lambda s: s.replace(b'"version":1', b'"version":1.0'), "not an integer"),
        (lambda s: s.replace(b'"version":1', b'"version":NaN'), "NaN is not allowed"),
        (lambda s: s.replace(b'"version":1', b'"version":1,"version":1'), "appears twice"),
        (lambda s: s.replace(b'"version":1', b'"version":' + b"9" * 30), "too long"),
        (lambda s: b"[" * 100_000 + b"]" * 100_000, "not ASCII JSON"),
        (lambda s: b"[]", "not a JSON object"),
        (lambda s: s.replace(b"s0", "s\u00f6".encode()), "not ASCII JSON"),
    ],
    ids=["truncated", "empty", "trailing-newline", "whitespace", "float", "nan", "duplicate-key", "huge-int",
         "deep-nesting", "array", "non-ascii"],
)
def test_malformed_state_refused(mangle: Callable[[bytes], bytes], match: str) -> None:
    federation = at_stage(2)
    with pytest.raises(SiteStateError, match=match):
        restore(federation, "s0", mangle(federation.sites["s0"].export_state()))


def test_oversized_state_refused_before_parsing() -> None:
    federation = at_stage(2)
    state = federation.sites["s0"].export_state()
    with pytest.raises(SiteStateError, match="more than the limit"):
        restore(federation, "s0", state, max_state_bytes=len(state) - 1)
    with pytest.raises(SiteStateError, match="more than the limit"):
        decode_site_state(
            b"{" + b" " * MAX_STATE_BYTES, site_id="s0", identity_public_key=federation.roster["s0"],
            federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND,
            roster_sha256=bytes(32), terms_sha256=bytes(32),
        )


def test_state_after_unmasking_holds_no_secrets() -> None:
    federation = at_stage(5)
    document = json.loads(federation.sites["s0"].export_state())
    assert document["stage"] == "unmask"
    assert document["secrets"] is None and document["shared"] is None and document["masked"] is None
    assert document["revealed"] and all(set(entry) == {"peer", "block", "kind"} for entry in document["revealed"])


def test_state_is_canonical_and_restores_to_the_same_bytes() -> None:
    federation = at_stage(4)
    state = federation.sites["s0"].export_state()
    document = json.loads(state)
    assert state == json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert document["version"] == 1
    assert restore(federation, "s0", state).export_state() == state
    assert restore(federation, "s0", state, contribution=None).export_state() == state


def test_from_state_refuses_a_contribution_of_the_wrong_type() -> None:
    federation = at_stage(1)
    with pytest.raises(TypeError):
        restore(federation, "s0", federation.sites["s0"].export_state(), contribution={"fusion": 1})


def test_constructor_still_requires_a_contribution() -> None:
    federation = new_federation()
    with pytest.raises(TypeError):
        federation.new_site("s0", contribution=None)


# ------------------------------------------------------------------ the files


def test_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    state_dir = tmp_path / "site" / "state"
    path = save_round_state(state_dir, 7, b"first")
    assert path == round_state_path(state_dir, 7) == state_dir / "secagg-round-7.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert load_round_state(state_dir, 7) == b"first"
    save_round_state(state_dir, 7, b"second")
    assert load_round_state(state_dir, 7) == b"second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_round_state(state_dir, 8) is None
    assert sorted(p.name for p in state_dir.iterdir()) == ["secagg-round-7.json"]


def test_state_file_replacement_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_round_state(tmp_path, 3, b"old")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="power cut"):
            save_round_state(tmp_path, 3, b"new")
    assert load_round_state(tmp_path, 3) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secagg-round-3.json"]  # no temporary file left


def test_discard_removes_the_state_file(tmp_path: Path) -> None:
    save_round_state(tmp_path, 3, b"state")
    save_round_state(tmp_path, 4, b"other round")
    assert discard_round_state(tmp_path, 3) is True
    assert load_round_state(tmp_path, 3) is None and not round_state_path(tmp_path, 3).exists()
    assert discard_round_state(tmp_path, 3) is False
    assert load_round_state(tmp_path, 4) == b"other round"


def test_state_file_readable_by_others_refused(tmp_path: Path) -> None:
    path = save_round_state(tmp_path, 3, b"state")
    path.chmod(0o644)
    with pytest.raises(SiteStateError, match="0644"):
        load_round_state(tmp_path, 3)


def test_state_file_that_is_a_symlink_refused(tmp_path: Path) -> None:
    target = save_round_state(tmp_path / "elsewhere", 3, b"state")
    round_state_path(tmp_path, 3).symlink_to(target)
    with pytest.raises(SiteStateError, match="symbolic link"):
        load_round_state(tmp_path, 3)


def test_oversized_state_file_refused(tmp_path: Path) -> None:
    save_round_state(tmp_path, 3, b"x" * 100)
    with pytest.raises(SiteStateError, match="more than the limit"):
        load_round_state(tmp_path, 3, max_bytes=99)
    assert load_round_state(tmp_path, 3, max_bytes=100) == b"x" * 100


@pytest.mark.parametrize("round_id", [-1, 2**64, True, "3"])
def test_state_file_of_a_bad_round_id_refused(tmp_path: Path, round_id: object) -> None:
    with pytest.raises(ValueError, match="round_id"):
        save_round_state(tmp_path, round_id, b"state")  # type: ignore[arg-type]


def test_state_file_holds_bytes_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_round_state(tmp_path, 3, "text")  # type: ignore[arg-type]
