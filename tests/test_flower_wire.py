"""The deployment runtime's envelope, roster and report checks, attack by attack: a
coordinator (or anyone on the path) cannot pass off one site's reply as another's, replay
it for another request or round, alter its body, or feed a site a request it would parse
loosely; and the coordinator reads no report it has not checked."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from blossom_secure.config import load_federation
from blossom_secure.crypto import generate_identity_key, identity_public_key
from blossom_secure.errors import AuthenticationError, PolicyError
from blossom_secure import wire
from blossom_secure.coordinator.steps import _checked_report
from blossom_secure.roster import load_roster, write_roster
from blossom_secure.secagg.errors import (
    InconsistentMessageError,
    MalformedMessageError,
    MessageTooLargeError,
    UnknownFieldError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)

FED = "blossom-demo"
DIGEST = hashlib.sha256(b"federation.toml").digest()
KEYS = {s: generate_identity_key() for s in ("north", "south")}
ROSTER = {s: identity_public_key(k) for s, k in KEYS.items()}


def request(stage="share_keys", *, round_id=3, recipient="north", body=b"message", **kwargs) -> bytes:
    return wire.encode_request(stage=stage, federation_id=FED, federation_sha256=DIGEST, round_id=round_id,
                               recipient=recipient, body=body, **kwargs)


def decode(data: bytes, **kwargs) -> wire.Request:
    return wire.decode_request(data, federation_id=FED, federation_sha256=DIGEST,
                               max_bytes=kwargs.pop("max_bytes", 1 << 20))


def reply_to(raw: bytes, *, site="north", key=None, body=b"answer", joined=None) -> bytes:
    return wire.encode_reply(request=decode(raw), untrusted_request=raw, site_id=site,
                             identity_key=key or KEYS[site], body=body, joined=joined)


def open_reply(data: bytes, raw: bytes, *, round_id=3, stage="share_keys") -> wire.Reply:
    return wire.decode_reply(data, roster=ROSTER, federation_id=FED, federation_sha256=DIGEST, round_id=round_id,
                             stage=stage, request=raw, max_bytes=1 << 20)


def reframe(data: bytes, edit) -> bytes:
    """The envelope with its header document edited (and re-encoded canonically)."""
    length = struct.unpack(">I", data[8:12])[0]
    doc = json.loads(data[12:12 + length])
    edit(doc)
    header = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return data[:8] + struct.pack(">I", len(header)) + header + data[12 + length:]


def test_request_and_reply_round_trip():
    raw = request()
    got = decode(raw)
    assert (got.stage, got.round_id, got.recipient, got.body) == ("share_keys", 3, "north", b"message")
    reply = open_reply(reply_to(raw), raw)
    assert (reply.site_id, reply.body, reply.joined) == ("north", b"answer", None)


def test_reply_signed_with_another_sites_key_is_refused():
    raw = request()
    with pytest.raises(AuthenticationError):
        open_reply(reply_to(raw, site="north", key=KEYS["south"]), raw)


def test_reply_from_a_site_outside_the_roster_is_refused():
    raw = request()
    with pytest.raises(UnknownSenderError):
        open_reply(reply_to(raw, site="intruder", key=generate_identity_key()), raw)


def test_reply_with_a_swapped_body_is_refused():
    raw = request()
    signed = reply_to(raw, body=b"answer")
    with pytest.raises(AuthenticationError):
        open_reply(signed[: -len(b"answer")] + b"ANSWER", raw)


def test_reply_with_an_edited_header_is_refused():
    raw = request()
    tampered = reframe(reply_to(raw, joined=None), lambda doc: doc.update(stage="masked_input"))
    with pytest.raises(AuthenticationError):
        open_reply(tampered, raw, stage="masked_input")


def test_reply_presented_as_the_answer_to_another_request_is_refused():
    first, second = request(body=b"one"), request(body=b"two")
    with pytest.raises(InconsistentMessageError):
        open_reply(reply_to(first), second)


def test_reply_replayed_from_another_round_is_refused():
    old = request(round_id=2)
    with pytest.raises(WrongRoundError):
        open_reply(reply_to(old), old, round_id=3)


def test_declined_offer_reply_carrying_a_message_is_refused():
    spec, body = wire.encode_blocks({"fusion": np.zeros(3, np.float32)})
    raw = request("offer", body=body, blocks=spec)
    with pytest.raises(InconsistentMessageError):
        open_reply(reply_to(raw, body=b"advert", joined=False), raw, stage="offer")
    assert open_reply(reply_to(raw, body=b"", joined=False), raw, stage="offer").joined is False


def test_request_for_another_version_of_the_federation_file_is_refused():
    raw = wire.encode_request(stage="unmask", federation_id=FED, federation_sha256=hashlib.sha256(b"x").digest(),
                              round_id=1, recipient="north", body=b"m")
    with pytest.raises(WrongFederationError):
        decode(raw)


def test_request_for_another_site_is_refused():
    with pytest.raises(WrongRecipientError):
        wire.check_recipient(decode(request(recipient="south")), "north")


@pytest.mark.parametrize("edit, error", [
    (lambda doc: doc.update(extra=1), UnknownFieldError),
    (lambda doc: doc.pop("recipient"), MalformedMessageError),
    (lambda doc: doc.update(version=2), UnsupportedVersionError),
    (lambda doc: doc.update(round_id=True), MalformedMessageError),
    (lambda doc: doc.update(round_id=-1), MalformedMessageError),
    (lambda doc: doc.update(recipient="north\n"), MalformedMessageError),
    (lambda doc: doc.update(stage="exfiltrate"), MalformedMessageError),
])
def test_request_header_with_a_bad_field_is_refused(edit, error):
    with pytest.raises(error):
        decode(reframe(request(), edit))


@pytest.mark.parametrize("header", [
    b'{"version":1,"version":1}',          # duplicate key
    b'{"round_id":1.0,"version":1}',       # a float
    b'{"round_id":NaN,"version":1}',       # not JSON
    b'{ "version":1}',                     # not canonical
    b'[1]',                                # not an object
])
def test_request_header_that_is_not_strict_canonical_json_is_refused(header):
    data = wire.MAGIC + struct.pack(">I", len(header)) + header
    with pytest.raises(MalformedMessageError):
        decode(data)


def test_oversized_request_is_refused_before_parsing():
    with pytest.raises(MessageTooLargeError):
        decode(b"\x00" * 65, max_bytes=64)


def test_header_length_beyond_the_envelope_is_refused():
    with pytest.raises(MalformedMessageError):
        decode(wire.MAGIC + struct.pack(">I", 1 << 20) + b"{}")


def test_global_blocks_outside_the_layout_or_not_finite_are_refused():
    spec, body = wire.encode_blocks({"fusion": np.ones(4, np.float32)})
    with pytest.raises(InconsistentMessageError):
        wire.decode_blocks(spec, body, expected_sizes={"fusion": 5})
    with pytest.raises(InconsistentMessageError):
        wire.decode_blocks(spec, body, expected_sizes={"encoder.image": 4})
    with pytest.raises(InconsistentMessageError):
        wire.decode_blocks(spec, body[:-4], expected_sizes={"fusion": 4})
    nan = np.frombuffer(body, "<f4").copy()
    nan[1] = np.nan
    with pytest.raises(InconsistentMessageError):
        wire.decode_blocks(spec, nan.tobytes(), expected_sizes={"fusion": 4})
    assert np.array_equal(wire.decode_blocks(spec, body, expected_sizes={"fusion": 4})["fusion"], np.ones(4))


def test_a_task_head_never_travels_in_an_announcement():
    with pytest.raises(ValueError):
        wire.encode_blocks({"head.malignancy": np.ones(2)})
    spec, body = wire.encode_blocks({"fusion": np.ones(2)})
    raw = request("offer", body=body, blocks=spec)
    with pytest.raises(MalformedMessageError):
        decode(reframe(raw, lambda doc: doc.update(blocks=[["head.malignancy", 2]])))


def test_finish_claiming_an_aggregate_without_its_value_is_refused():
    spec, body = wire.encode_blocks({"fusion": np.ones(2)})
    good = wire.BlockResultEntry("fusion", ("north", "south"), None)
    assert decode(request("finish", body=body, blocks=spec, outcomes=(good,))).outcomes == (good,)
    with pytest.raises(ValueError):  # the encoder refuses what a site would refuse
        request("finish", body=body, blocks=spec, outcomes=(wire.BlockResultEntry("encoder.image", ("north",), None),))
    raw = request("finish", body=body, blocks=spec, outcomes=(good,))
    bad = reframe(raw, lambda doc: doc["outcomes"][0].update(block="encoder.image"))
    with pytest.raises(InconsistentMessageError):
        decode(bad)


def report(**changes) -> bytes:
    doc = {"type": "site-report", "version": 1, "site": "north", "round": 3, "declined": None,
           "tasks": {"malignancy": {"accuracy": 0.5, "macro_f1": 0.4, "majority_class_rate": 0.5}},
           "epsilon_total": 1.5, "epsilon_nominal": False} | changes
    return json.dumps(doc).encode()


def test_report_of_another_site_or_round_is_refused():
    assert _checked_report(report(), site_id="north", round_id=3)
    with pytest.raises(InconsistentMessageError):
        _checked_report(report(site="south"), site_id="north", round_id=3)
    with pytest.raises(InconsistentMessageError):
        _checked_report(report(round=2), site_id="north", round_id=3)


@pytest.mark.parametrize("changes", [
    {"tasks": {"malignancy": {"accuracy": 7.0, "macro_f1": 0.4, "majority_class_rate": 0.5}}},
    {"epsilon_total": -1.0},
    {"declined": "a long story with patient details"},
    {"n_patients": 12},
])
def test_report_with_values_out_of_range_or_extra_fields_is_refused(changes):
    with pytest.raises(MalformedMessageError):
        _checked_report(report(**changes), site_id="north", round_id=3)


def test_oversized_or_non_json_report_is_refused():
    with pytest.raises(MalformedMessageError):
        _checked_report(b" " * (64 * 1024 + 1), site_id="north", round_id=3)
    with pytest.raises(MalformedMessageError):
        _checked_report(report().replace(b"1.5", b"NaN"), site_id="north", round_id=3)


def test_roster_round_trip_and_every_problem_at_once(tiny_sites, tmp_path):
    federation = load_federation(tiny_sites / "federation.toml")
    path = write_roster(tmp_path / "roster.toml", federation=federation, keys=ROSTER)
    assert dict(load_roster(path, federation=federation)) == ROSTER
    key = ROSTER["north"].hex()
    path.write_text(f'[roster]\nfederation = "other"\nextra = 1\n[roster.sites]\n"a" = "{key}"\n"b" = "{key}"\n'
                    f'"c" = "zz"\n"D" = "{key}"\n"e" = "{"0" * 64}"\n')
    with pytest.raises(PolicyError) as info:
        load_roster(path, federation=federation)
    reasons = " | ".join(str(p) for p in info.value.problems)
    for expected in ("not 'blossom-demo'", "unknown key", "same key as 'a'", "lower-case hex", "not a site id",
                     "more than the federation's max_sites"):
        assert expected in reasons, reasons


def test_roster_node_keys_round_trip_and_a_forged_or_partial_table_is_refused(tiny_sites, tmp_path):
    """[roster.node_keys]: what SuperNode authentication registers. A key of the wrong kind
    (an Ed25519 or P-256 key where P-384 is required), one key for two sites, a key for a
    site outside the roster, or a roster site left out: every problem at once."""
    from blossom_secure.crypto import generate_node_auth_key, node_auth_public_line
    from blossom_secure.roster import load_node_keys

    federation = load_federation(tiny_sites / "federation.toml")
    lines = {site: node_auth_public_line(generate_node_auth_key()) for site in ROSTER}
    path = write_roster(tmp_path / "roster.toml", federation=federation, keys=ROSTER, node_keys=lines)
    assert dict(load_node_keys(path, federation=federation)) == lines
    assert dict(load_roster(path, federation=federation)) == ROSTER
    plain = write_roster(tmp_path / "plain.toml", federation=federation, keys=ROSTER)
    assert dict(load_node_keys(plain, federation=federation)) == {}  # authentication off
    first, second = sorted(ROSTER)
    ed25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    for table, expected in (
            ([(first, lines[first]), (second, lines[first]), ("stranger", lines[second])],
             (f"same node key as '{first}'", "not a site of [roster.sites]")),
            ([(first, lines[first]), (second, ed25519)], ("ecdsa-sha2-nistp384",)),
            ([(first, lines[first]), (second, lines[second].replace("AAAA", "AAAB", 1))], ("not a valid",))):
        path.write_text(plain.read_text() + "\n[roster.node_keys]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in table))
        with pytest.raises(PolicyError) as info:
            load_node_keys(path, federation=federation)
        reasons = " | ".join(str(p) for p in info.value.problems)
        assert all(e in reasons for e in expected), reasons
    path.write_text(plain.read_text() + f'\n[roster.node_keys]\n"{first}" = "{lines[first]}"\n')
    with pytest.raises(PolicyError, match="has no node key"):
        load_node_keys(path, federation=federation)
