"""The audit log: canonical JSON vectors, build/write/verify round trips, and one test per
tampering attack, each asserting the line and seq of the first bad record.

Regenerate the vector file (only when the format changes on purpose) with
``python -m tests.test_audit --write-vectors``; it keeps the test-only signing key already in
the file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blossom_secure import crypto
from blossom_secure.audit import log as audit
from blossom_secure.audit.log import (
    GENESIS_SHA256,
    MAX_RECORD_BYTES,
    RECORD_SIGNING_CONTEXT,
    AuditLog,
    build_record,
    canonical_bytes,
    checkpoint_path,
    read_records,
    read_verified_records,
    verify_log,
    write_record,
)
from blossom_secure.errors import AuditIntegrityError

VECTORS = Path(__file__).parent / "vectors" / "audit_canonical.json"

KEY = crypto.generate_identity_key()
PUBLIC_KEY = crypto.identity_public_key(KEY)
OTHER_KEY = crypto.generate_identity_key()
SITE = "st-mary"
POLICY = "ab" * 32
PAYLOAD_SHA = "cd" * 32


def independent_json(value) -> bytes:
    """The standard library's sorted, compact, UTF-8 JSON: equal to the canonical form for
    values without floats that Python and ECMAScript print differently."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def time_at(i: int) -> str:
    return f"2026-03-01T12:{i // 60:02d}:{i % 60:02d}.000000Z"


def sample_events(key=KEY) -> list[tuple[str, int | None, dict, str | None]]:
    fingerprint = crypto.key_fingerprint(crypto.identity_public_key(key))
    training = {
        "steps": 120,
        "epsilon_round": 0.75,
        "epsilon_total": 0.75,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.02,
    }
    egress = {
        "message_type": "masked_input",
        "blocks": ["encoder.image", "fusion"],
        "shapes": {"encoder.image": [64, 3, 3, 3], "fusion": [64, 64]},
        "payload_bytes": 40_000,
        "payload_sha256": PAYLOAD_SHA,
    }
    return [
        ("site_initialised", None, {"key_fingerprint": fingerprint}, None),
        ("policy_loaded", None, {"policy_sha256": POLICY, "shareable": ["encoder.*", "fusion"]}, POLICY),
        ("round_joined", 1, {}, POLICY),
        ("training_finished", 1, training, POLICY),
        ("egress", 1, egress, POLICY),
        ("secagg_stage_completed", 1, {"stage": "unmask"}, POLICY),
        ("round_declined", 2, {"reason": "privacy budget would be exceeded"}, POLICY),
        ("round_joined", 3, {}, POLICY),
        ("secagg_aborted", 3, {"stage": "share_keys", "reason": "fewer than t sites left"}, POLICY),
        ("error", None, {"message": "coordinator unreachable"}, POLICY),
    ]


def make_log(directory: Path, events=None, *, key=KEY, site=SITE) -> Path:
    path = directory / "audit.jsonl"
    with AuditLog.open(path, site_id=site, signing_key=key) as log:
        for i, (event, round_id, details, policy) in enumerate(events if events is not None else sample_events(key)):
            log._append_at_time(time_at(i), event, round_id=round_id, details=details, policy_sha256=policy)
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def signed_line(unsigned: dict, key=KEY) -> bytes:
    """A line whose signature is valid for ``unsigned`` as given (however malformed)."""
    signature = crypto.sign(key, RECORD_SIGNING_CONTEXT + canonical_bytes(unsigned))
    return canonical_bytes({**unsigned, "signature": signature.hex()}) + b"\n"


def expect_broken(path: Path, *, line: int, seq: int | None, reason: str, public_key: bytes = PUBLIC_KEY):
    with pytest.raises(AuditIntegrityError) as info:
        verify_log(path, public_key=public_key)
    error = info.value
    assert (error.line, error.seq) == (line, seq), str(error)
    assert reason in error.reason, error.reason
    return error


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return make_log(tmp_path)


# ----------------------------------------------------------------------------------------
# Canonical JSON
# ----------------------------------------------------------------------------------------


def load_vectors() -> dict:
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def test_canonical_vectors_match_and_independent_json_agrees():
    for vector in load_vectors()["canonical"]:
        expected = vector["canonical_utf8"].encode("utf-8")
        assert canonical_bytes(vector["value"]) == expected, vector["name"]
        assert independent_json(vector["value"]) == expected, vector["name"]
        assert hashlib.sha256(expected).hexdigest() == vector["sha256"], vector["name"]


def test_canonical_vectors_where_python_json_differs():
    for vector in load_vectors()["jcs_only"]:
        expected = vector["canonical_utf8"].encode("utf-8")
        assert canonical_bytes(vector["value"]) == expected, vector["name"]
        assert independent_json(vector["value"]) != expected, vector["name"]
        assert hashlib.sha256(expected).hexdigest() == vector["sha256"], vector["name"]


def test_canonical_number_vectors_rfc8785():
    for vector in load_vectors()["numbers"]:
        (value,) = struct.unpack(">d", bytes.fromhex(vector["ieee754"]))
        assert canonical_bytes(value) == vector["canonical"].encode("ascii"), vector["ieee754"]


def test_canonical_invalid_numbers_rejected():
    for hex_bits in load_vectors()["invalid_numbers"]:
        (value,) = struct.unpack(">d", bytes.fromhex(hex_bits))
        with pytest.raises(ValueError):
            canonical_bytes({"x": value})


@pytest.mark.skipif(shutil.which("node") is None, reason="node (an ECMAScript JSON implementation) not installed")
def test_canonical_matches_ecmascript_reference(tmp_path):
    """RFC 8785's own reference: JSON.stringify for primitives, keys in UTF-16 order."""
    vectors = load_vectors()
    script = tmp_path / "jcs.js"
    script.write_text(
        """
        const canon = v => (v === null || typeof v !== "object") ? JSON.stringify(v)
          : Array.isArray(v) ? "[" + v.map(canon).join(",") + "]"
          : "{" + Object.keys(v).sort().map(k => JSON.stringify(k) + ":" + canon(v[k])).join(",") + "}";
        const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const out = {
          values: input.values.map(canon),
          numbers: input.numbers.map(h => canon(Buffer.from(h, "hex").readDoubleBE(0))),
        };
        process.stdout.write(JSON.stringify(out));
        """
    )
    values = [v["value"] for v in vectors["canonical"] + vectors["jcs_only"]] + [v for v in vectors["records_unsigned"]]
    numbers = [v["ieee754"] for v in vectors["numbers"]]
    result = subprocess.run(
        ["node", str(script)],
        input=json.dumps({"values": values, "numbers": numbers}),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(result.stdout)
    assert out["values"] == [canonical_bytes(v).decode("utf-8") for v in values]
    assert out["numbers"] == [v["canonical"] for v in vectors["numbers"]]


def test_canonical_rejects_what_json_readers_disagree_on():
    for bad in (float("nan"), float("inf"), -float("inf"), 2**53, -(2**53), "\ud800", {"k": "x\udfff"}):
        with pytest.raises(ValueError):
            canonical_bytes(bad)
    nested: list = []
    for _ in range(40):
        nested = [nested]
    with pytest.raises(ValueError):
        canonical_bytes(nested)
    for bad in ({1: "x"}, {"k": object()}, b"bytes", {1, 2}):
        with pytest.raises(TypeError):
            canonical_bytes(bad)
    assert canonical_bytes(2**53 - 1) == b"9007199254740991"
    assert canonical_bytes(-0.0) == b"0"
    assert canonical_bytes((1, "a")) == b'[1,"a"]'


def test_canonical_key_order_is_utf16_code_units():
    assert canonical_bytes({"\ue000": 1, "\U0001f600": 2, "b": 3, "a": 4}) == (
        '{"a":4,"b":3,"\U0001f600":2,"\ue000":1}'.encode()
    )


@settings(max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_float_round_trips(x):
    text = canonical_bytes(x).decode("ascii")
    assert float(text) == x
    assert canonical_bytes(audit._loads(text.encode("ascii"))) == text.encode("ascii")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200)
@given(json_values)
def test_canonical_bytes_are_stable_through_a_json_reader(value):
    once = canonical_bytes(value)
    assert canonical_bytes(audit._loads(once)) == once


# ----------------------------------------------------------------------------------------
# Record vectors
# ----------------------------------------------------------------------------------------


def test_record_vectors():
    vectors = load_vectors()
    key = crypto.identity_key_from_pem(vectors["signing_key_pem"].encode("ascii"))
    public_key = crypto.identity_public_key(key)
    assert public_key.hex() == vectors["public_key_hex"]
    prev = GENESIS_SHA256
    for vector in vectors["records"]:
        inputs = vector["inputs"]
        assert inputs["prev_hash"] == prev
        record = build_record(**inputs, signing_key=key)
        line = vector["line_utf8"].encode("utf-8")
        assert canonical_bytes(record) == line, vector["name"]
        # Independent computation: standard-library JSON, hashlib, and the signature over it.
        assert independent_json(record) == line
        assert hashlib.sha256(line).hexdigest() == vector["line_sha256"]
        unsigned = {k: v for k, v in record.items() if k != "signature"}
        crypto.verify_signature(
            public_key, RECORD_SIGNING_CONTEXT + independent_json(unsigned), bytes.fromhex(record["signature"])
        )
        prev = vector["line_sha256"]


def test_record_vectors_verify_as_a_log(tmp_path):
    vectors = load_vectors()
    key = crypto.identity_key_from_pem(vectors["signing_key_pem"].encode("ascii"))
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(v["line_utf8"].encode("utf-8") + b"\n" for v in vectors["records"]))
    last = vectors["records"][-1]
    audit._write_checkpoint(
        checkpoint_path(path),
        site_id=SITE,
        last_seq=last["inputs"]["seq"],
        last_hash=last["line_sha256"],
        signing_key=key,
    )
    report = verify_log(path, public_key=crypto.identity_public_key(key))
    assert report.records == len(vectors["records"])
    assert report.last_hash == last["line_sha256"]


# ----------------------------------------------------------------------------------------
# Build, write, verify
# ----------------------------------------------------------------------------------------


def test_build_write_verify_round_trip(log_path):
    report = verify_log(log_path, public_key=PUBLIC_KEY)
    events = sample_events()
    assert report.records == len(events)
    assert report.last_seq == len(events) - 1
    assert report.checkpoint_seq == report.last_seq
    assert report.site_id == SITE
    assert report.first_time == time_at(0)
    assert report.last_time == time_at(len(events) - 1)
    assert report.last_hash == hashlib.sha256(lines_of(log_path)[-1][:-1]).hexdigest()
    records = read_records(log_path)
    assert [r["event"] for r in records] == [e[0] for e in events]
    assert [r["seq"] for r in records] == list(range(len(events)))
    assert records[0]["prev_sha256"] == GENESIS_SHA256
    for previous, line, record in zip(lines_of(log_path), lines_of(log_path)[1:], records[1:], strict=False):
        assert record["prev_sha256"] == hashlib.sha256(previous[:-1]).hexdigest()
        assert canonical_bytes(json.loads(line)) + b"\n" == line
    assert read_verified_records(log_path, public_key=PUBLIC_KEY) == (report, records)


def test_build_record_is_pure_and_copies_details():
    details = {"reason": "budget"}
    kwargs = dict(
        seq=0,
        time_utc=time_at(0),
        site_id=SITE,
        round_id=4,
        event="round_declined",
        details=details,
        policy_sha256=POLICY,
        prev_hash=GENESIS_SHA256,
        signing_key=KEY,
    )
    first, second = build_record(**kwargs), build_record(**kwargs)
    assert first == second  # Ed25519 is deterministic; no clock, no state
    details["reason"] = "changed"
    assert first["details"] == {"reason": "budget"}


def test_build_record_normalises_numpy_and_tuples():
    numpy = pytest.importorskip("numpy")
    record = build_record(
        seq=0,
        time_utc=time_at(0),
        site_id=SITE,
        round_id=numpy.int64(1),
        event="egress",
        details={
            "message_type": "masked_input",
            "blocks": ("fusion",),
            "shapes": {"fusion": (numpy.int64(8), 8)},
            "payload_bytes": numpy.int64(256),
            "payload_sha256": PAYLOAD_SHA,
        },
        policy_sha256=POLICY,
        prev_hash=GENESIS_SHA256,
        signing_key=KEY,
    )
    assert record["round_id"] == 1 and type(record["round_id"]) is int
    assert record["details"]["shapes"] == {"fusion": [8, 8]}
    assert type(record["details"]["payload_bytes"]) is int


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event": "launched_missiles"}, "unknown event"),
        ({"details": {}}, "miss key(s): reason"),
        ({"details": {"reason": "x", "extra": 1}}, "unknown key(s)"),
        ({"details": {"reason": 7}}, "details['reason'] must be a string"),
        ({"details": {"reason": ""}}, "1 to 2000 characters"),
        ({"round_id": None}, "needs a round_id"),
        ({"round_id": -1}, "round_id"),
        ({"policy_sha256": None}, "needs the policy_sha256"),
        ({"policy_sha256": "AB" * 32}, "policy_sha256"),
        ({"time_utc": "2026-03-01 12:00:00"}, "time_utc"),
        ({"time_utc": "2026-02-30T12:00:00Z"}, "time_utc"),
        ({"time_utc": "2026-03-01T12:00:00+01:00"}, "time_utc"),
        ({"site_id": "St Mary"}, "site_id"),
        ({"seq": -1}, "seq"),
        ({"seq": True}, "seq"),
        ({"prev_hash": "00"}, "prev_sha256"),
        ({"prev_hash": "11" * 32}, "genesis"),
        ({"event": "training_finished", "details": {"steps": 1}}, "miss key(s)"),
        (
            {
                "event": "training_finished",
                "details": {
                    "steps": 1.5,
                    "epsilon_round": -1,
                    "epsilon_total": float("nan"),
                    "delta": 1.0,
                    "noise_multiplier": 1,
                    "sample_rate": 0,
                },
            },
            "details['steps'] must be an integer >= 0; details['epsilon_round']",
        ),
        (
            {
                "event": "egress",
                "details": {
                    "message_type": "masked_input",
                    "blocks": ["fusion"],
                    "shapes": {"encoder.image": [3]},
                    "payload_bytes": 10,
                    "payload_sha256": PAYLOAD_SHA,
                },
            },
            "names block(s) not in 'blocks'",
        ),
        (
            {
                "event": "egress",
                "details": {
                    "message_type": "masked_input",
                    "blocks": ["fusion", "fusion"],
                    "shapes": {},
                    "payload_bytes": 10,
                    "payload_sha256": PAYLOAD_SHA,
                },
            },
            "must not repeat",
        ),
        (
            {
                "event": "egress",
                "details": {
                    "message_type": "masked_input",
                    "blocks": ["not a block"],
                    "shapes": {},
                    "payload_bytes": 10,
                    "payload_sha256": PAYLOAD_SHA,
                },
            },
            "block name",
        ),
        ({"event": "site_initialised", "details": {"key_fingerprint": "0000:" * 7 + "0000"}}, "signing key"),
        (
            {"event": "policy_loaded", "details": {"policy_sha256": "ef" * 32, "shareable": []}},
            "differs from the record's policy_sha256",
        ),
        ({"details": {"reason": "x" * 2001}}, "1 to 2000 characters"),
        ({"site_id": "st-mary\n"}, "site_id"),
        ({"policy_sha256": POLICY + "\n"}, "policy_sha256"),
        ({"time_utc": time_at(0) + "\n"}, "time_utc"),
        ({"time_utc": "\u0662026-03-01T12:00:00Z"}, "time_utc"),
        (
            {
                "event": "egress",
                "details": {
                    "message_type": "masked_input\n",
                    "blocks": ["fusion\n"],
                    "shapes": {},
                    "payload_bytes": 10,
                    "payload_sha256": PAYLOAD_SHA,
                },
            },
            "details['message_type'] must be an identifier",
        ),
        (
            {
                "event": "egress",
                "details": {
                    "message_type": "masked_input",
                    "blocks": ["fusion\n"],
                    "shapes": {},
                    "payload_bytes": 10,
                    "payload_sha256": PAYLOAD_SHA,
                },
            },
            "block name",
        ),
    ],
)
def test_build_record_rejects_misuse(change, message):
    kwargs = dict(
        seq=0,
        time_utc=time_at(0),
        site_id=SITE,
        round_id=1,
        event="round_declined",
        details={"reason": "budget"},
        policy_sha256=POLICY,
        prev_hash=GENESIS_SHA256,
        signing_key=KEY,
    )
    kwargs.update(change)
    with pytest.raises(ValueError) as info:
        build_record(**kwargs)
    assert message in str(info.value)


def test_build_record_rejects_wrong_types():
    base = dict(
        seq=0,
        time_utc=time_at(0),
        site_id=SITE,
        round_id=1,
        event="round_declined",
        policy_sha256=POLICY,
        prev_hash=GENESIS_SHA256,
    )
    with pytest.raises(TypeError):
        build_record(**base, details=["reason"], signing_key=KEY)
    with pytest.raises(TypeError):
        build_record(**base, details={"reason": object()}, signing_key=KEY)
    with pytest.raises(TypeError):
        build_record(**base, details={"reason": "x"}, signing_key=b"not a key")


def test_build_record_rejects_overlong_record():
    with pytest.raises(ValueError, match="longer than"):
        build_record(
            seq=0,
            time_utc=time_at(0),
            site_id=SITE,
            round_id=None,
            event="policy_loaded",
            details={"policy_sha256": POLICY, "shareable": ["\x01" * 64] * 256},
            policy_sha256=POLICY,
            prev_hash=GENESIS_SHA256,
            signing_key=KEY,
        )


def _first_error_record() -> dict:
    return build_record(seq=0, time_utc=time_at(0), site_id=SITE, round_id=None, event="error",
                        details={"message": "x"}, policy_sha256=None, prev_hash=GENESIS_SHA256, signing_key=KEY)


def test_write_record_appends_and_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    record = _first_error_record()
    synced: list[bytes] = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit.os, "fsync", lambda fd: (synced.append(path.read_bytes()), real_fsync(fd)))
    write_record(path, record)
    assert synced == [canonical_bytes(record) + b"\n"]  # the line was on disk when fsync ran
    assert path.read_bytes() == canonical_bytes(record) + b"\n"


def test_write_record_rejects_unsigned_record_and_missing_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    record = _first_error_record()
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    with pytest.raises(ValueError, match="missing field"):
        write_record(path, unsigned)
    assert path.read_bytes() == b""
    with pytest.raises(FileNotFoundError):
        write_record(tmp_path / "absent.jsonl", record)


def test_write_record_refuses_a_symbolic_link(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(b"")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    record = _first_error_record()
    with pytest.raises(OSError):
        write_record(link, record)
    assert target.read_bytes() == b""


def test_checkpoint_path_names():
    assert checkpoint_path(Path("state/audit.jsonl")) == Path("state/audit.head.json")
    assert checkpoint_path(Path("state/audit")) == Path("state/audit.head.json")
    with pytest.raises(ValueError):
        checkpoint_path(Path("state/audit.head.json"))


def test_open_in_a_missing_folder_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        AuditLog.open(tmp_path / "no" / "audit.jsonl", site_id=SITE, signing_key=KEY)


def test_append_writes_record_before_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    order: list[str] = []
    real_write, real_checkpoint = audit.write_record, audit._write_checkpoint
    monkeypatch.setattr(audit, "write_record", lambda *a: (order.append("record"), real_write(*a))[1])
    monkeypatch.setattr(
        audit, "_write_checkpoint", lambda *a, **k: (order.append("checkpoint"), real_checkpoint(*a, **k))[1]
    )
    with AuditLog.open(path, site_id=SITE, signing_key=KEY) as log:
        order.clear()
        record = log.append("error", round_id=None, details={"message": "x"}, policy_sha256=None)
    assert order == ["record", "checkpoint"]
    assert audit._parse_time(record["time_utc"]) is not None


# ----------------------------------------------------------------------------------------
# Opening, reopening, refusing
# ----------------------------------------------------------------------------------------


def test_open_creates_empty_log_and_signed_checkpoint(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, site_id=SITE, signing_key=KEY) as log:
        assert log.last_seq is None
        assert log.last_hash == GENESIS_SHA256
        assert log.path == path
    assert path.read_bytes() == b""
    assert checkpoint_path(path) == tmp_path / "audit.head.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(checkpoint_path(path).stat().st_mode) == 0o600
    report = verify_log(path, public_key=PUBLIC_KEY)
    assert (report.records, report.last_seq, report.checkpoint_seq) == (0, None, None)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_reopen_and_continue_keeps_the_chain(log_path):
    before = lines_of(log_path)
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        assert log.last_seq == len(before) - 1
        assert log.last_hash == hashlib.sha256(before[-1][:-1]).hexdigest()
        record = log.append("round_joined", round_id=4, details={"model_version": "v4"}, policy_sha256=POLICY)
    after = lines_of(log_path)
    assert after[: len(before)] == before
    assert record["seq"] == len(before)
    assert record["prev_sha256"] == hashlib.sha256(before[-1][:-1]).hexdigest()
    assert verify_log(log_path, public_key=PUBLIC_KEY).records == len(before) + 1


def test_checkpoint_temporary_left_by_a_kill_is_removed_on_open(log_path):
    """SIGKILL between the checkpoint's temporary file and its rename leaves
    ``.audit.head.json.<random>.tmp`` in the state folder; the next open (the lock holder,
    so nobody is mid-write) removes it, and only it."""
    stale = log_path.parent / ".audit.head.json.k1ll3d.tmp"
    stale.write_bytes(b'{"half": "written')
    other = log_path.parent / ".ledger.json.abc.tmp"  # not the log's to remove
    other.write_bytes(b"x")
    before = lines_of(log_path)
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY):
        pass
    assert not stale.exists() and other.exists()
    assert lines_of(log_path) == before
    assert verify_log(log_path, public_key=PUBLIC_KEY).records == len(before)


def test_open_refuses_a_broken_log(log_path):
    lines = lines_of(log_path)
    lines[3] = lines[3].replace(b'"steps":120', b'"steps":121')
    write_lines(log_path, lines)
    before = log_path.read_bytes(), checkpoint_path(log_path).read_bytes()
    with pytest.raises(AuditIntegrityError) as info:
        AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    assert (info.value.line, info.value.seq) == (4, 3)
    assert (log_path.read_bytes(), checkpoint_path(log_path).read_bytes()) == before
    # The lock was released: after repair (here: restoring the line) the log opens.
    lines[3] = lines[3].replace(b'"steps":121', b'"steps":120')
    write_lines(log_path, lines)
    AuditLog.open(log_path, site_id=SITE, signing_key=KEY).close()


def test_open_refuses_log_of_another_key(log_path):
    with pytest.raises(AuditIntegrityError) as info:
        AuditLog.open(log_path, site_id=SITE, signing_key=OTHER_KEY)
    assert (info.value.line, info.value.seq) == (1, 0)


def test_open_refuses_log_of_another_site(log_path):
    with pytest.raises(ValueError, match="belongs to site 'st-mary'"):
        AuditLog.open(log_path, site_id="st-john", signing_key=KEY)


def test_open_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        AuditLog.open(tmp_path / "audit.jsonl", site_id="Not A Site", signing_key=KEY)
    with pytest.raises(TypeError):
        AuditLog.open(tmp_path / "audit.jsonl", site_id=SITE, signing_key="key")
    with pytest.raises(ValueError):
        AuditLog.open(tmp_path / "audit.head.json", site_id=SITE, signing_key=KEY)
    with pytest.raises(TypeError):
        AuditLog(_token=None, path=tmp_path, site_id=SITE, signing_key=KEY, lock_file=None, last_seq=None, last_hash="")
    assert list(tmp_path.iterdir()) == []


def test_second_open_is_refused_while_first_is_open(log_path):
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY), pytest.raises(RuntimeError, match="already open"):
        AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    AuditLog.open(log_path, site_id=SITE, signing_key=KEY).close()


def test_dropping_an_unclosed_log_releases_its_lock(log_path):
    log = AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    del log
    gc.collect()
    AuditLog.open(log_path, site_id=SITE, signing_key=KEY).close()


def test_append_after_close_is_refused(log_path):
    log = AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append("error", round_id=None, details={"message": "x"}, policy_sha256=None)


def test_invalid_append_changes_nothing(log_path):
    before = log_path.read_bytes(), checkpoint_path(log_path).read_bytes()
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        with pytest.raises(ValueError):
            log.append("egress", round_id=1, details={"message_type": "x"}, policy_sha256=POLICY)
        assert log.last_seq == len(sample_events()) - 1
    assert (log_path.read_bytes(), checkpoint_path(log_path).read_bytes()) == before


def test_failed_write_blocks_further_appends_until_reopened(log_path, monkeypatch):
    log = AuditLog.open(log_path, site_id=SITE, signing_key=KEY)

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "write", disk_full)
    with pytest.raises(OSError):
        log.append("error", round_id=None, details={"message": "x"}, policy_sha256=None)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="reopen"):
        log.append("error", round_id=None, details={"message": "x"}, policy_sha256=None)
    log.close()
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        log.append("error", round_id=None, details={"message": "x"}, policy_sha256=None)
    verify_log(log_path, public_key=PUBLIC_KEY)


def test_interrupted_append_is_accepted_and_checkpoint_repaired_on_open(log_path):
    """A crash between writing the record and replacing the checkpoint."""
    old_checkpoint = checkpoint_path(log_path).read_bytes()
    last = lines_of(log_path)[-1]
    record = build_record(
        seq=len(sample_events()),
        time_utc=time_at(99),
        site_id=SITE,
        round_id=None,
        event="error",
        details={"message": "crash follows"},
        policy_sha256=None,
        prev_hash=hashlib.sha256(last[:-1]).hexdigest(),
        signing_key=KEY,
    )
    write_record(log_path, record)
    report = verify_log(log_path, public_key=PUBLIC_KEY)
    assert report.checkpoint_seq == report.last_seq - 1
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        assert log.last_seq == record["seq"]
    assert checkpoint_path(log_path).read_bytes() != old_checkpoint
    report = verify_log(log_path, public_key=PUBLIC_KEY)
    assert report.checkpoint_seq == report.last_seq == record["seq"]


def test_open_refuses_when_log_deleted_but_checkpoint_remains(log_path):
    log_path.unlink()
    with pytest.raises(AuditIntegrityError, match="deleted"):
        AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    assert not log_path.exists()


# ----------------------------------------------------------------------------------------
# Tampering: one test per attack, each naming the first bad record
# ----------------------------------------------------------------------------------------


def test_edited_field_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[4])
    record["details"]["payload_bytes"] = 12  # under-report what left the site
    lines[4] = canonical_bytes(record) + b"\n"
    write_lines(log_path, lines)
    expect_broken(log_path, line=5, seq=4, reason="signature does not verify")


def test_edited_round_detected(log_path):
    lines = lines_of(log_path)
    lines[6] = lines[6].replace(b'"round_id":2', b'"round_id":7')
    write_lines(log_path, lines)
    expect_broken(log_path, line=7, seq=6, reason="signature does not verify")


def test_edited_bytes_outside_the_json_values_detected(log_path):
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b'","', b'", "', 1)
    write_lines(log_path, lines)
    expect_broken(log_path, line=3, seq=2, reason="not in canonical form")


def test_edited_signature_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[2])
    record["signature"] = record["signature"][:-1] + ("0" if record["signature"][-1] != "0" else "1")
    lines[2] = canonical_bytes(record) + b"\n"
    write_lines(log_path, lines)
    expect_broken(log_path, line=3, seq=2, reason="signature does not verify")


def test_deleted_record_detected(log_path):
    lines = lines_of(log_path)
    del lines[4]  # the egress record
    write_lines(log_path, lines)
    expect_broken(log_path, line=5, seq=5, reason="sequence number 5 follows 3 (record missing")


def test_deleted_first_record_detected(log_path):
    write_lines(log_path, lines_of(log_path)[1:])
    expect_broken(log_path, line=1, seq=1, reason="first record has sequence number 1, expected 0")


def test_reordered_records_detected(log_path):
    lines = lines_of(log_path)
    lines[4], lines[5] = lines[5], lines[4]
    write_lines(log_path, lines)
    expect_broken(log_path, line=5, seq=5, reason="sequence number 5 follows 3")


def test_replayed_record_detected(log_path):
    lines = lines_of(log_path)
    lines.insert(5, lines[4])
    write_lines(log_path, lines)
    expect_broken(log_path, line=6, seq=4, reason="sequence number 4 follows 4 (record out of order or repeated)")


def test_inserted_forged_record_detected(log_path):
    """A record with the right seq and previous-hash, signed with the attacker's key."""
    lines = lines_of(log_path)
    forged = build_record(
        seq=5,
        time_utc=time_at(5),
        site_id=SITE,
        round_id=1,
        event="egress",
        details={
            "message_type": "masked_input",
            "blocks": [],
            "shapes": {},
            "payload_bytes": 1,
            "payload_sha256": PAYLOAD_SHA,
        },
        policy_sha256=POLICY,
        prev_hash=hashlib.sha256(lines[4][:-1]).hexdigest(),
        signing_key=OTHER_KEY,
    )
    lines.insert(5, canonical_bytes(forged) + b"\n")
    write_lines(log_path, lines)
    expect_broken(log_path, line=6, seq=5, reason="signature does not verify")


def test_chain_spliced_from_another_log_detected(tmp_path):
    """Validly signed records of the same site, but from a different history."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_log(tmp_path / "a")
    other_events = sample_events()
    other_events[2] = ("round_joined", 9, {}, POLICY)
    second = make_log(tmp_path / "b", other_events)
    spliced = lines_of(first)[:3] + lines_of(second)[3:]
    write_lines(first, spliced)
    expect_broken(first, line=4, seq=3, reason="previous-hash does not match line 3")


def test_truncated_tail_detected(log_path):
    write_lines(log_path, lines_of(log_path)[:-2])
    expect_broken(
        log_path, line=9, seq=8, reason="log ends at seq 7 but the signed checkpoint records seq 9 (truncated)"
    )


def test_truncated_to_empty_detected(log_path):
    log_path.write_bytes(b"")
    expect_broken(log_path, line=1, seq=0, reason="log is empty but the signed checkpoint records seq 9 (truncated)")


def test_torn_last_line_detected(log_path):
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])
    expect_broken(log_path, line=10, seq=None, reason="incomplete")


def test_record_signed_with_other_key_detected(tmp_path):
    path = make_log(tmp_path, key=OTHER_KEY)
    verify_log(path, public_key=crypto.identity_public_key(OTHER_KEY))
    expect_broken(path, line=1, seq=0, reason="signature does not verify")


def test_single_record_resigned_with_other_key_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[3])
    del record["signature"]
    lines[3] = signed_line(record, OTHER_KEY)
    write_lines(log_path, lines)
    expect_broken(log_path, line=4, seq=3, reason="signature does not verify")


def test_corrupt_line_detected(log_path):
    lines = lines_of(log_path)
    lines[1] = b"this is not json\n"
    write_lines(log_path, lines)
    expect_broken(log_path, line=2, seq=None, reason="corrupt line: not valid JSON")
    with pytest.raises(AuditIntegrityError) as info:
        read_records(log_path)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\n", "empty line"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"seq": 1, "seq": 2}\n', "not valid JSON"),
        (b'{"x": NaN}\n', "not valid JSON"),
        (b'{"x": 1e400}\n', "not valid JSON"),
        (b"\xff\xfe{}\n", "not UTF-8"),
        (b"[" * MAX_RECORD_BYTES + b"\n", "longer than"),
        (b"[" * 50_000 + b"\n", "not valid JSON"),
    ],
)
def test_corrupt_line_variants_detected(log_path, line, reason):
    lines = lines_of(log_path)
    lines[2] = line
    write_lines(log_path, lines)
    expect_broken(log_path, line=3, seq=None, reason=reason)


def test_missing_checkpoint_detected(log_path):
    checkpoint_path(log_path).unlink()
    expect_broken(log_path, line=10, seq=9, reason="checkpoint audit.head.json is missing")


def test_forged_checkpoint_detected(log_path):
    """A truncation with a checkpoint re-signed by the attacker's key."""
    lines = lines_of(log_path)[:-2]
    write_lines(log_path, lines)
    audit._write_checkpoint(
        checkpoint_path(log_path),
        site_id=SITE,
        last_seq=7,
        last_hash=hashlib.sha256(lines[-1][:-1]).hexdigest(),
        signing_key=OTHER_KEY,
    )
    expect_broken(log_path, line=8, seq=7, reason="checkpoint audit.head.json: signature does not verify")


@pytest.mark.parametrize(
    "content",
    [b"", b"{}\n", b"not json\n", b'{"format":1}\n', b"{" + b" " * 5000 + b"}\n"],
)
def test_corrupt_checkpoint_detected(log_path, content):
    checkpoint_path(log_path).write_bytes(content)
    expect_broken(log_path, line=10, seq=9, reason="checkpoint audit.head.json is corrupt")


def test_checkpoint_rolled_back_detected(log_path):
    """An old checkpoint restored beside a longer log (lag of more than one record)."""
    lines = lines_of(log_path)
    audit._write_checkpoint(
        checkpoint_path(log_path),
        site_id=SITE,
        last_seq=6,
        last_hash=hashlib.sha256(lines[6][:-1]).hexdigest(),
        signing_key=KEY,
    )
    expect_broken(log_path, line=9, seq=8, reason="checkpoint records seq 6 but the log continues to seq 9")


def test_tail_replaced_detected(tmp_path):
    """Same length, different last record, both validly signed: the checkpoint tells."""
    first = make_log(tmp_path)
    other_events = sample_events()
    other_events[-1] = ("error", None, {"message": "something else"}, POLICY)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = make_log(other_dir, other_events)
    write_lines(first, lines_of(first)[:-1] + lines_of(second)[-1:])
    expect_broken(first, line=10, seq=9, reason="does not match the signed checkpoint (tail replaced)")


def test_log_deleted_beside_checkpoint_detected(log_path):
    log_path.unlink()
    expect_broken(log_path, line=1, seq=0, reason="log file is missing but its signed checkpoint")


def test_unknown_field_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    del record["signature"]
    record["note"] = "added later"
    lines[-1] = signed_line(record)
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=9, reason="unknown field(s): 'note'")


def test_missing_field_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    del record["signature"], record["policy_sha256"]
    lines[-1] = signed_line(record)
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=9, reason="missing field(s): policy_sha256")


def test_malformed_field_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    del record["signature"]
    record["seq"] = "9"
    lines[-1] = signed_line(record)
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=None, reason="field 'seq' must be an integer")


def test_invalid_details_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    del record["signature"]
    record["details"] = {"message": "x", "stack": "..."}
    lines[-1] = signed_line(record)
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=9, reason="unknown key(s): 'stack'")


def test_signature_with_trailing_newline_detected(log_path):
    """bytes.fromhex() skips whitespace, so the hex pattern must not accept a final newline."""
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    record["signature"] += "\n"
    lines[-1] = canonical_bytes(record) + b"\n"
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=9, reason="field 'signature' must be 128 lower-case hex digits")


def test_site_id_change_detected(log_path):
    lines = lines_of(log_path)
    record = json.loads(lines[-1])
    del record["signature"]
    record["site_id"] = "st-john"
    lines[-1] = signed_line(record)
    write_lines(log_path, lines)
    expect_broken(log_path, line=10, seq=9, reason="site id 'st-john' differs from 'st-mary'")


def test_verify_log_rejects_bad_arguments(tmp_path, log_path):
    with pytest.raises(TypeError):
        verify_log(log_path, public_key=PUBLIC_KEY.hex())
    with pytest.raises(ValueError):
        verify_log(log_path, public_key=PUBLIC_KEY[:31])
    with pytest.raises(FileNotFoundError):
        verify_log(tmp_path / "nothing.jsonl", public_key=PUBLIC_KEY)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nothing.jsonl")


# ----------------------------------------------------------------------------------------
# Property: any event sequence verifies; any single flipped byte is detected
# ----------------------------------------------------------------------------------------

hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
block_names = st.sampled_from(["encoder.image", "encoder.tabular", "fusion", "head.malignancy"])
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
free_text = st.text(min_size=1, max_size=30)
rounds = st.integers(0, 1000)
non_negative = st.floats(0, 50, allow_nan=False)


@st.composite
def egress_events(draw):
    blocks = draw(st.lists(block_names, unique=True, max_size=3))
    shaped = draw(st.lists(st.sampled_from(blocks), unique=True) if blocks else st.just([]))
    shapes = {b: draw(st.lists(st.integers(0, 512), max_size=4)) for b in shaped}
    details = {
        "message_type": draw(identifiers),
        "blocks": blocks,
        "shapes": shapes,
        "payload_bytes": draw(st.integers(0, 10**9)),
        "payload_sha256": draw(hex64),
    }
    return ("egress", draw(st.none() | rounds), details, draw(hex64))


@st.composite
def training_events(draw):
    details = {
        "steps": draw(st.integers(0, 10**6)),
        "epsilon_round": draw(non_negative),
        "epsilon_total": draw(non_negative),
        "delta": draw(st.floats(1e-12, 0.5)),
        "noise_multiplier": draw(non_negative),
        "sample_rate": draw(st.floats(1e-6, 1.0)),
    }
    return ("training_finished", draw(rounds), details, draw(hex64))


events = st.one_of(
    egress_events(),
    training_events(),
    st.builds(lambda r, t, p: ("round_declined", r, {"reason": t}, p), rounds, free_text, hex64),
    st.builds(lambda r, p: ("round_joined", r, {}, p), rounds, hex64),
    st.builds(lambda r, s, p: ("secagg_stage_completed", r, {"stage": s}, p), rounds, identifiers, hex64),
    st.builds(
        lambda r, s, t, p: ("secagg_aborted", r, {"stage": s, "reason": t}, p), rounds, identifiers, free_text, hex64
    ),
    st.builds(lambda r, t: ("error", r, {"message": t}, None), st.none() | rounds, free_text),
    st.builds(lambda p: ("policy_loaded", None, {"policy_sha256": p, "shareable": ["encoder.*"]}, p), hex64),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_list=st.lists(events, min_size=1, max_size=6), data=st.data())
def test_any_event_sequence_verifies_and_any_flipped_byte_is_detected(event_list, data):
    with tempfile.TemporaryDirectory() as directory:
        path = make_log(Path(directory), event_list)
        report = verify_log(path, public_key=PUBLIC_KEY)
        assert report.records == len(event_list)
        original = path.read_bytes()
        index = data.draw(st.integers(0, len(original) - 1), label="byte")
        mask = data.draw(st.integers(1, 255), label="xor")
        tampered = bytearray(original)
        tampered[index] ^= mask
        path.write_bytes(bytes(tampered))
        with pytest.raises(AuditIntegrityError):
            verify_log(path, public_key=PUBLIC_KEY)
        with pytest.raises(AuditIntegrityError):
            AuditLog.open(path, site_id=SITE, signing_key=KEY)
        assert path.read_bytes() == bytes(tampered)
        # The checkpoint is protected the same way.
        path.write_bytes(original)
        head = checkpoint_path(path)
        head_bytes = bytearray(head.read_bytes())
        head_bytes[data.draw(st.integers(0, len(head_bytes) - 1), label="checkpoint byte")] ^= mask
        head.write_bytes(bytes(head_bytes))
        with pytest.raises(AuditIntegrityError):
            verify_log(path, public_key=PUBLIC_KEY)


# ----------------------------------------------------------------------------------------
# Vector generation (run by hand: python -m tests.test_audit --write-vectors)
# ----------------------------------------------------------------------------------------

# RFC 8785, Appendix B: IEEE 754 doubles and their JCS serialisations.
_RFC8785_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]
_RFC8785_INVALID = ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"]


def _generate_vectors(signing_key_pem: str) -> dict:
    key = crypto.identity_key_from_pem(signing_key_pem.encode("ascii"))
    public_key = crypto.identity_public_key(key)
    canonical_values = [
        (
            "unsigned egress record",
            {
                "format": 1,
                "seq": 4,
                "time_utc": "2026-03-01T12:00:04.000000Z",
                "site_id": SITE,
                "round_id": 1,
                "event": "egress",
                "details": {
                    "message_type": "masked_input",
                    "blocks": ["encoder.image", "fusion"],
                    "shapes": {"fusion": [64, 64], "encoder.image": [64, 3, 3, 3]},
                    "payload_bytes": 40000,
                    "payload_sha256": PAYLOAD_SHA,
                },
                "policy_sha256": POLICY,
                "prev_sha256": GENESIS_SHA256,
            },
        ),
        (
            "string escapes and non-ASCII",
            {"b": 'line\nbreak\ttab\u0001\u001f"quote\\ \u007f \u2028', "a": "Hôpital Saint-Éloi — ε épuisé 🙂"},
        ),
        ("nesting, literals and integers", {"z": [], "y": {}, "x": [None, True, False, 0, -1, 2**53 - 1]}),
        ("floats printed alike by Python and ECMAScript", {"eps": 0.5, "d": 0.0001, "n": 1.1, "big": 123456.789}),
    ]
    jcs_only = [
        ("integral float", {"x": 3.0}, '{"x":3}'),
        ("small float without exponent", {"delta": 1e-05}, '{"delta":0.00001}'),
        ("large floats", {"x": 1e21, "y": 1e20}, '{"x":1e+21,"y":100000000000000000000}'),
        ("keys in UTF-16 order", {"\ue000": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ue000":1}'),
    ]
    record_inputs = [
        (
            "site_initialised",
            dict(
                round_id=None,
                event="site_initialised",
                details={"key_fingerprint": crypto.key_fingerprint(public_key)},
                policy_sha256=None,
            ),
        ),
        (
            "policy_loaded",
            dict(
                round_id=None,
                event="policy_loaded",
                details={"policy_sha256": POLICY, "shareable": ["encoder.*", "fusion"]},
                policy_sha256=POLICY,
            ),
        ),
        (
            "training_finished",
            dict(
                round_id=1,
                event="training_finished",
                details={
                    "steps": 120,
                    "epsilon_round": 0.75,
                    "epsilon_total": 1.25,
                    "delta": 0.0001,
                    "noise_multiplier": 1.1,
                    "sample_rate": 0.02,
                },
                policy_sha256=POLICY,
            ),
        ),
        (
            "round_declined, non-ASCII reason",
            dict(
                round_id=2,
                event="round_declined",
                details={"reason": "budget épuisé: ε would reach 8.3 > 8"},
                policy_sha256=POLICY,
            ),
        ),
    ]
    records = []
    prev = GENESIS_SHA256
    for seq, (name, partial_inputs) in enumerate(record_inputs):
        inputs = {"seq": seq, "time_utc": time_at(seq), "site_id": SITE, **partial_inputs, "prev_hash": prev}
        record = build_record(**inputs, signing_key=key)
        line = canonical_bytes(record)
        if independent_json(record) != line:
            raise SystemExit(f"record vector {name!r} does not match the independent computation")
        prev = hashlib.sha256(line).hexdigest()
        records.append({"name": name, "inputs": inputs, "line_utf8": line.decode("utf-8"), "line_sha256": prev})
    for name, value in canonical_values:
        if independent_json(value) != canonical_bytes(value):
            raise SystemExit(f"canonical vector {name!r} does not match the independent computation")
    for name, value, expected in jcs_only:
        if canonical_bytes(value) != expected.encode("utf-8"):
            raise SystemExit(f"JCS vector {name!r} does not match")
    for hex_bits, expected in _RFC8785_NUMBERS:
        if canonical_bytes(struct.unpack(">d", bytes.fromhex(hex_bits))[0]) != expected.encode():
            raise SystemExit(f"RFC 8785 number {hex_bits} does not match")
    return {
        "description": (
            "Audit log vectors for blossom_secure.audit. Made by `python -m tests.test_audit "
            "--write-vectors`. 'canonical': values whose canonical bytes equal Python's "
            "json.dumps(sort_keys=True, separators=(',', ':'), ensure_ascii=False), checked against "
            "it at generation and in the tests. 'jcs_only': values where RFC 8785 and Python's json "
            "module differ (integral floats, exponent thresholds, UTF-16 key order); expected bytes "
            "derived from RFC 8785 section 3.2 and checked against node's JSON.stringify (the RFC's "
            "reference) in test_canonical_matches_ecmascript_reference. 'numbers' and "
            "'invalid_numbers': RFC 8785 Appendix B. 'records': a chain of signed records built "
            "with the TEST-ONLY key below (Ed25519 is deterministic); each line is checked against "
            "the standard-library JSON encoding, hashlib and a signature check over it."
        ),
        "canonical": [
            {
                "name": name,
                "value": value,
                "canonical_utf8": canonical_bytes(value).decode("utf-8"),
                "sha256": hashlib.sha256(canonical_bytes(value)).hexdigest(),
            }
            for name, value in canonical_values
        ],
        "jcs_only": [
            {
                "name": name,
                "value": value,
                "canonical_utf8": expected,
                "sha256": hashlib.sha256(expected.encode("utf-8")).hexdigest(),
            }
            for name, value, expected in jcs_only
        ],
        "numbers": [{"ieee754": h, "canonical": c} for h, c in _RFC8785_NUMBERS],
        "invalid_numbers": _RFC8785_INVALID,
        "signing_key_pem": signing_key_pem,
        "public_key_hex": public_key.hex(),
        "records": records,
        "records_unsigned": [
            {k: v for k, v in json.loads(r["line_utf8"]).items() if k != "signature"} for r in records
        ],
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-vectors"]:
        raise SystemExit("usage: python -m tests.test_audit --write-vectors")
    if VECTORS.exists():
        pem = json.loads(VECTORS.read_text(encoding="utf-8"))["signing_key_pem"]
    else:
        pem = crypto.identity_key_to_pem(crypto.generate_identity_key()).decode("ascii")
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(_generate_vectors(pem), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}")


# ----------------------------------------------------------------------------------------
# Re-verifying an open log (the site agent's ledger reconciliation reads through this)
# ----------------------------------------------------------------------------------------


def test_verified_records_reverifies_and_filters(log_path):
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        report, everything = log.verified_records()
        assert report.records == len(sample_events()) == len(everything)
        _, training = log.verified_records(events=(audit.TRAINING_FINISHED,))
        assert [r["event"] for r in training] == ["training_finished"]
        assert training[0] == everything[3]
        record = log.append("training_finished", round_id=4, details=sample_events()[3][2], policy_sha256=POLICY)
        _, training = log.verified_records(events=(audit.TRAINING_FINISHED,))
        assert training[-1] == record


def test_verified_records_refuses_a_log_rolled_back_while_open(log_path):
    head = checkpoint_path(log_path)
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        old = log_path.read_bytes(), head.read_bytes()
        log.append("round_joined", round_id=9, details={}, policy_sha256=POLICY)
        # both files put back to their earlier, consistent and validly signed state
        log_path.write_bytes(old[0])
        head.write_bytes(old[1])
        with pytest.raises(AuditIntegrityError, match="does not end at the record this site agent wrote last"):
            log.verified_records()


def test_verified_records_refuses_a_log_edited_while_open(log_path):
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        lines = lines_of(log_path)
        lines[3] = lines[3].replace(b'"steps":120', b'"steps":12')
        write_lines(log_path, lines)
        with pytest.raises(AuditIntegrityError, match="signature does not verify"):
            log.verified_records(events=(audit.TRAINING_FINISHED,))


def test_verified_records_rejects_misuse(log_path):
    log = AuditLog.open(log_path, site_id=SITE, signing_key=KEY)
    with pytest.raises(ValueError, match="unknown event"):
        log.verified_records(events=("training_done",))
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.verified_records()


def ledger_rebuilt_details(**change) -> dict:
    details = {
        "rounds": 3, "rounds_proven": 2, "rounds_kept": 1, "epsilon_total": 2.5, "delta": 1e-5,
        "accountant": "rdp", "ledger_sha256": "ef" * 32, "previous_ledger": "readable",
        "previous_ledger_sha256": "01" * 32,
    }
    details.update(change)
    return {k: v for k, v in details.items() if v is not None}


def test_ledger_rebuilt_event_verifies(log_path):
    with AuditLog.open(log_path, site_id=SITE, signing_key=KEY) as log:
        log.append(audit.LEDGER_REBUILT, round_id=None, details=ledger_rebuilt_details(), policy_sha256=POLICY)
        log.append(audit.LEDGER_REBUILT, round_id=None, policy_sha256=POLICY,
                   details=ledger_rebuilt_details(previous_ledger="missing", previous_ledger_sha256=None))
    assert verify_log(log_path, public_key=PUBLIC_KEY).records == len(sample_events()) + 2


@pytest.mark.parametrize("change, message", [
    ({"rounds": -1}, "details['rounds'] must be an integer >= 0"),
    ({"ledger_sha256": None}, "miss key(s): ledger_sha256"),
    ({"epsilon_total": float("inf")}, "details['epsilon_total']"),
    ({"extra": 1}, "unknown key(s): 'extra'"),
])
def test_ledger_rebuilt_event_details_are_checked(change, message):
    with pytest.raises(ValueError) as info:
        build_record(seq=0, time_utc=time_at(0), site_id=SITE, round_id=None, event=audit.LEDGER_REBUILT,
                     details=ledger_rebuilt_details(**change), policy_sha256=POLICY, prev_hash=GENESIS_SHA256,
                     signing_key=KEY)
    assert message in str(info.value)


def test_ledger_rebuilt_event_needs_the_policy():
    with pytest.raises(ValueError, match="needs the policy_sha256"):
        build_record(seq=0, time_utc=time_at(0), site_id=SITE, round_id=None, event=audit.LEDGER_REBUILT,
                     details=ledger_rebuilt_details(), policy_sha256=None, prev_hash=GENESIS_SHA256, signing_key=KEY)


# ----------------------------------------------------------------------------------------
# Fast verification: the checkpoint's signature binds the chain; no record slips through
# ----------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=st.dictionaries(st.text(max_size=6), _json_values, max_size=5))
def test_fast_reader_accepts_a_line_only_if_it_is_the_canonical_one(value):
    """The fast reader (C JSON) must never accept a spelling that canonical_bytes would not
    write: whatever Python's json.dumps makes of any value, the fast reader returns a
    record only if those bytes are exactly the value's canonical bytes."""
    try:
        spelled = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return
    accepted = audit._fast_canonical_record(spelled)
    if accepted is not None:
        assert canonical_bytes(accepted) == spelled
    try:
        canonical = canonical_bytes(value)
    except (ValueError, TypeError):
        return
    again = audit._fast_canonical_record(canonical)
    assert again is None or canonical_bytes(again) == canonical


@pytest.mark.parametrize("line", [
    b'{"a":1.0}', b'{"a":1e-05}', b'{"a":1,"a":2}', b'{"a": 1}', b'{"a":9007199254740993}', b'{"a":NaN}',
    b'{"a":"\\u00e9"}', '{"\U0001f600":1,"\ue000":2}'.encode(), b'{"b":1,"a":2}', b'{"a":1E400}',
], ids=["integral_float", "exponent_float", "duplicate_key", "space", "big_int", "nan", "escaped_non_ascii",
        "astral_key_order", "unsorted", "overflow"])
def test_fast_reader_refuses_every_non_canonical_spelling(line):
    assert audit._fast_canonical_record(line) is None


def test_signing_bytes_cut_from_the_line_equal_the_computed_ones(log_path):
    for raw in lines_of(log_path):
        record = json.loads(raw)
        assert audit._signing_bytes_of_line(raw[:-1], record) == audit._record_signing_bytes(record)


def test_fast_and_full_verification_agree_on_an_intact_log(log_path):
    fast = verify_log(log_path, public_key=PUBLIC_KEY)
    full = verify_log(log_path, public_key=PUBLIC_KEY, every_signature=True)
    assert fast == full
    _, fast_records = read_verified_records(log_path, public_key=PUBLIC_KEY)
    _, full_records = read_verified_records(log_path, public_key=PUBLIC_KEY, every_signature=True)
    assert fast_records == full_records


def test_forged_record_appended_after_the_checkpoint_is_detected(log_path):
    """Attack: append a record, correctly chained, signed with another key, and leave the
    checkpoint one behind (as an interrupted append would). The checkpoint does not cover
    it, so its own signature is checked even on the fast path."""
    last = lines_of(log_path)[-1]
    forged = build_record(seq=len(lines_of(log_path)), time_utc=time_at(98), site_id=SITE, round_id=None,
                          event="error", details={"message": "all is well"}, policy_sha256=None,
                          prev_hash=hashlib.sha256(last[:-1]).hexdigest(), signing_key=OTHER_KEY)
    write_record(log_path, forged)
    line = len(lines_of(log_path))
    expect_broken(log_path, line=line, seq=forged["seq"], reason="signature does not verify")


def test_edited_record_under_the_checkpoint_is_named_as_by_the_full_check(log_path):
    """The fast path rejects (the chain no longer meets the checkpoint) and the error is the
    full check's: the edited record, by its signature."""
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b'"round_id":1', b'"round_id":2')
    write_lines(log_path, lines)
    error = expect_broken(log_path, line=3, seq=2, reason="signature does not verify")
    with pytest.raises(AuditIntegrityError) as full:
        verify_log(log_path, public_key=PUBLIC_KEY, every_signature=True)
    assert str(full.value) == str(error)


# ----------------------------------------------------------------------------------------
# Verification in parts, in parallel processes (large logs, `audit verify`)
# ----------------------------------------------------------------------------------------


@pytest.fixture
def long_log(tmp_path: Path, monkeypatch) -> Path:
    """A log of 60 records that is verified in parts (the size threshold lowered for it)."""
    monkeypatch.setattr(audit, "PARALLEL_MIN_BYTES", 1)
    events = sample_events()
    body = [e for e in events if e[0] not in ("site_initialised", "policy_loaded")]
    return make_log(tmp_path, events[:2] + body * 7)


def _verdict(path: Path, workers: int) -> object:
    try:
        return verify_log(path, public_key=PUBLIC_KEY, workers=workers)
    except AuditIntegrityError as error:
        return (error.line, error.seq, error.reason)


def test_verification_in_parts_is_used_and_agrees_with_one_process(long_log, monkeypatch):
    used = []
    real = audit._feed_in_parallel
    monkeypatch.setattr(audit, "_feed_in_parallel", lambda *a: used.append(real(*a)) or used[-1])
    for workers in (2, 3, 7):
        assert verify_log(long_log, public_key=PUBLIC_KEY, workers=workers) == verify_log(long_log,
                                                                                          public_key=PUBLIC_KEY)
    assert len(used) == 3 and all(chain is not None for chain in used)


def test_record_removed_at_a_part_boundary_is_caught(long_log):
    """Attack: delete the line a part boundary falls after (the one the next part
    continues from), hoping each part's chain is intact on its own."""
    (offset, line), = audit._split_points(long_log, 2)
    lines = lines_of(long_log)
    index = lines.index(line + b"\n")
    write_lines(long_log, lines[:index] + lines[index + 1:])
    assert isinstance(_verdict(long_log, 2), tuple)
    assert _verdict(long_log, 2) == _verdict(long_log, 1)


def test_parts_of_two_logs_spliced_at_a_boundary_are_caught(long_log, tmp_path):
    """Attack: the first half of this site's log followed by the second half of another
    log of the same site signed with the same key (each part intact, the checkpoint the
    second log's)."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    events = sample_events()
    other = make_log(other_dir, events[:2] + [("round_declined", 9, {"reason": "maintenance"}, POLICY)] * 60)
    mine, theirs = lines_of(long_log), lines_of(other)
    write_lines(long_log, mine[:30] + theirs[30:])
    shutil.copyfile(checkpoint_path(other), checkpoint_path(long_log))
    assert isinstance(_verdict(long_log, 2), tuple)
    assert _verdict(long_log, 2) == _verdict(long_log, 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=st.sampled_from(["drop", "duplicate", "swap", "flip", "truncate"]), where=st.integers(0, 59),
       workers=st.integers(2, 5))
def test_verification_in_parts_gives_the_one_process_verdict_on_any_tampering(long_log, change, where, workers):
    original = long_log.read_bytes()
    try:
        lines = lines_of(long_log)
        where %= len(lines)
        if change == "drop":
            del lines[where]
        elif change == "duplicate":
            lines.insert(where, lines[where])
        elif change == "swap":
            other = (where + 1) % len(lines)
            lines[where], lines[other] = lines[other], lines[where]
        elif change == "flip":
            lines[where] = lines[where].replace(b'"seq":', b'"seq": ', 1)
        else:
            lines = lines[:where + 1]
        write_lines(long_log, lines)
        assert _verdict(long_log, workers) == _verdict(long_log, 1)
    finally:
        long_log.write_bytes(original)


def test_a_small_log_is_verified_in_one_process(log_path, monkeypatch):
    monkeypatch.setattr(audit.os, "fork", lambda: pytest.fail("forked for a small log"))
    assert verify_log(log_path, public_key=PUBLIC_KEY, workers=4).records == len(sample_events())


# ----------------------------------------------------------------------------------------
# The shortcuts of the one-process check never pass what the full checks refuse
# ----------------------------------------------------------------------------------------


def test_fast_reader_accepts_the_canonical_spelling_of_a_float_python_spells_otherwise():
    assert audit._fast_canonical_record(b'{"a":0.00001,"b":[1e+21,0.5]}') == {"a": 1e-05, "b": [1e21, 0.5]}
    # the same text in a string beside the float: the respelling is not trusted, the strict path decides
    assert audit._fast_canonical_record(b'{"a":0.00001,"b":":1e-05,"}') is None
    assert audit._fast_canonical_record(b'{"a":1e-05}') is None


_ENVELOPE_VALUES = {
    "format": st.sampled_from([1, 2, 0, True, "1", 1.5]),
    "seq": st.sampled_from([0, 7, -1, 2**53 - 1, 2**53, True, "3", None]),
    "time_utc": st.sampled_from(["2026-03-01T12:00:00Z", "2026-03-01T12:00:00.123456Z", "2026-02-30T12:00:00Z",
                                 "2026-03-01T24:00:00Z", "2026-03-01T12:00:60Z", "2026-03-01 12:00:00Z",
                                 "2026-03-01T12:00:00.1234567Z", "x"]),
    "site_id": st.sampled_from([SITE, "a", "A-site", "-x", "x" * 63, "x" * 64, "", 3]),
    "round_id": st.sampled_from([None, 0, 5, -1, 2**53, True, "1"]),
    "event": st.sampled_from(["error", "egress", 'a"b', "", 5]),
    "policy_sha256": st.sampled_from([None, POLICY, POLICY.upper(), "ab", 1]),
    "prev_sha256": st.sampled_from([GENESIS_SHA256, POLICY, "zz" * 32, None]),
    "signature": st.sampled_from(["ef" * 64, "EF" * 64, "ef" * 63, None]),
}


@settings(max_examples=300, deadline=None)
@given(fields=st.fixed_dictionaries(_ENVELOPE_VALUES), drop=st.sampled_from([None, *_ENVELOPE_VALUES]),
       extra=st.sampled_from([None, "dz", "extra", "zz"]))
def test_envelope_shortcut_never_passes_what_the_full_check_refuses(fields, drop, extra):
    """Attack: any malformed envelope (wrong type, out-of-range seq, impossible date, a
    missing or extra field) in an otherwise canonical line: the one-match shortcut may
    only pass what the field-by-field check passes."""
    record = {**fields, "details": {"message": "m"}}
    if drop is not None:
        del record[drop]
    if extra is not None:
        record[extra] = 1
    try:
        raw = canonical_bytes(record)
    except (TypeError, ValueError):
        return
    if audit._canonical_envelope_ok(raw, record):
        assert audit._envelope_problems(record, signed=True) == []


def test_envelope_shortcut_passes_real_records(log_path):
    for raw in lines_of(log_path):
        assert audit._canonical_envelope_ok(raw[:-1], json.loads(raw))
