"""The wire format: round trips, canonical form, limits, and fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, ROUND, Federation, make_keys

from blossom_secure import crypto
from blossom_secure.errors import ProtocolError
from blossom_secure.secagg.errors import (
    AuthenticationError,
    MalformedMessageError,
    MessageTooLargeError,
    UnknownFieldError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)
from blossom_secure.secagg.messages import (
    WIRE_VERSION,
    AdvertiseKeys,
    BlockKeys,
    BlockShares,
    BlockSignature,
    BlockSignatures,
    BlockSurvivors,
    ConsistencyRequest,
    ConsistencyResponse,
    EncryptedShare,
    EncryptedShares,
    KeyBundle,
    MaskedBlock,
    MaskedInput,
    MessageType,
    RevealedShare,
    ShareDelivery,
    ShareKind,
    SharePlaintext,
    SiteSignature,
    UnmaskRequest,
    UnmaskResponse,
    decode_coordinator_message,
    decode_share_plaintext,
    decode_site_message,
    encode_coordinator_message,
    encode_share_plaintext,
    encode_site_message,
    is_valid_identifier,
    peek_message_type,
)
from blossom_secure.secagg.kdf import signature_payload

KEYS, ROSTER = make_keys(["a", "b"])
LIMIT = 1 << 20


def site_messages() -> list:
    vector = np.arange(7, dtype="<u4")
    context = dict(federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND, site_id="a")
    return [
        AdvertiseKeys(
            **context,
            share_public_key=bytes(range(32)),
            min_contributors=3,
            blocks=(BlockKeys("encoder.image", bytes(32), bytes(32)), BlockKeys("fusion", b"\x01" * 32, b"\x02" * 32)),
        ),
        EncryptedShares(**context, shares=(EncryptedShare("b", bytes(12), b"ct" * 20),)),
        MaskedInput(**context, blocks=(MaskedBlock("fusion", vector),)),
        UnmaskResponse(
            **context,
            shares=(
                RevealedShare("a", "fusion", ShareKind.SELF_MASK_SEED, bytes(66)),
                RevealedShare("b", "fusion", ShareKind.MASK_KEY, b"\x01" * 66),
            ),
        ),
        ConsistencyResponse(
            **context,
            signatures=(BlockSignature("encoder.image", b"\x03" * 64), BlockSignature("fusion", b"\x04" * 64)),
        ),
    ]


def coordinator_messages() -> list:
    context = dict(federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND, recipient="b")
    return [
        KeyBundle(**context, advertisements=(b"x", b"y")),
        ShareDelivery(**context, share_senders=("a", "b"), shares=(EncryptedShare("a", bytes(12), b"c" * 30),)),
        UnmaskRequest(
            **context,
            survivors=("a", "b"),
            dropped=("c",),
            consistency=(
                BlockSignatures("fusion", (SiteSignature("a", b"\x05" * 64), SiteSignature("b", b"\x06" * 64))),
            ),
        ),
        ConsistencyRequest(
            **context,
            blocks=(BlockSurvivors("encoder.image", ("a", "b")), BlockSurvivors("fusion", ("a", "b", "c"))),
        ),
    ]


def decode_site(data: bytes, **overrides: object) -> object:
    arguments = dict(
        federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND, roster=ROSTER, max_bytes=LIMIT
    )
    arguments.update(overrides)
    return decode_site_message(data, **arguments)


def decode_coordinator(data: bytes, **overrides: object) -> object:
    arguments = dict(
        federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND, recipient="b", max_bytes=LIMIT
    )
    arguments.update(overrides)
    return decode_coordinator_message(data, **arguments)


@pytest.mark.parametrize("message", site_messages(), ids=lambda m: type(m).__name__)
def test_site_messages_round_trip(message: object) -> None:
    decoded = decode_site(encode_site_message(message, KEYS["a"]))
    if isinstance(message, MaskedInput):
        assert decoded.blocks[0].vector.tolist() == message.blocks[0].vector.tolist()
    else:
        assert decoded == message


@pytest.mark.parametrize("message", coordinator_messages(), ids=lambda m: type(m).__name__)
def test_coordinator_messages_round_trip(message: object) -> None:
    data = encode_coordinator_message(message)
    assert decode_coordinator(data) == message
    assert peek_message_type(data, max_bytes=LIMIT) == message.TYPE


def test_share_plaintext_round_trip_and_party_binding() -> None:
    plaintext = SharePlaintext(
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=ROUND,
        sender="a",
        recipient="b",
        blocks=(BlockShares("fusion", bytes(66), bytes(66)),),
    )
    data = encode_share_plaintext(plaintext)
    context = dict(federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=ROUND)
    assert decode_share_plaintext(data, **context, sender="a", recipient="b") == plaintext
    with pytest.raises(MalformedMessageError):
        decode_share_plaintext(data, **context, sender="a", recipient="c")
    with pytest.raises(WrongRoundError):
        decode_share_plaintext(data, **{**context, "round_id": ROUND + 1}, sender="a", recipient="b")
    with pytest.raises(WrongFederationError):
        decode_share_plaintext(data, **{**context, "federation_sha256": bytes(32)}, sender="a", recipient="b")


def test_encoding_is_deterministic() -> None:
    for message in coordinator_messages():
        assert encode_coordinator_message(message) == encode_coordinator_message(message)


def test_oversized_message_rejected_before_parsing() -> None:
    data = encode_site_message(site_messages()[2], KEYS["a"])
    with pytest.raises(MessageTooLargeError):
        decode_site(data, max_bytes=len(data) - 1)
    with pytest.raises(MessageTooLargeError):
        decode_site(b"\x00" * (LIMIT + 1))


def test_wrong_version_rejected() -> None:
    data = bytearray(encode_coordinator_message(coordinator_messages()[2]))
    struct.pack_into(">H", data, 4, WIRE_VERSION + 1)
    with pytest.raises(UnsupportedVersionError):
        decode_coordinator(bytes(data))


@pytest.mark.parametrize("data", [b"", b"BSS", b"XXXX\x00\x01\x06", b"BSSA\x00\x01\x63"])
def test_garbage_headers_rejected(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_coordinator(data)


def test_unknown_field_rejected() -> None:
    data = encode_coordinator_message(coordinator_messages()[2])
    with pytest.raises(UnknownFieldError):
        decode_coordinator(data + b"\x09\x00\x00")
    tampered = bytearray(data)
    tampered[7] = 0x42  # the first field's tag
    with pytest.raises(UnknownFieldError):
        decode_coordinator(bytes(tampered))


def test_fields_out_of_order_rejected() -> None:
    tampered = bytearray(encode_coordinator_message(coordinator_messages()[2]))
    tampered[7] = 2  # a known tag in the wrong place
    with pytest.raises(MalformedMessageError):
        decode_coordinator(bytes(tampered))


def test_trailing_bytes_rejected() -> None:
    data = encode_coordinator_message(coordinator_messages()[0])
    with pytest.raises(MalformedMessageError):
        decode_coordinator(data + b"\x00")


def test_truncated_messages_rejected_at_every_length() -> None:
    data = encode_coordinator_message(coordinator_messages()[1])
    for end in range(len(data)):
        with pytest.raises(MalformedMessageError):
            decode_coordinator(data[:end])


def test_non_canonical_lists_rejected() -> None:
    good = coordinator_messages()[2]
    for survivors in (("b", "a"), ("a", "a")):
        forged = UnmaskRequest.__new__(UnmaskRequest)
        for name, value in (
            ("federation_id", FEDERATION),
            ("federation_sha256", FEDERATION_SHA256),
            ("round_id", ROUND),
            ("recipient", "b"),
            ("survivors", survivors),
            ("dropped", ()),
            ("consistency", ()),
        ):
            object.__setattr__(forged, name, value)
        with pytest.raises(MalformedMessageError, match="canonical"):
            decode_coordinator(encode_coordinator_message(forged))
    assert decode_coordinator(encode_coordinator_message(good)) == good


def test_invalid_identifiers_rejected() -> None:
    for bad in ("", "-a", "a b", "é", "a" * 65, "a/b", "st-mary\n", "st-mary\r\n", "\nst-mary"):
        assert not is_valid_identifier(bad)
        with pytest.raises(ValueError):
            UnmaskRequest(
                federation_id=FEDERATION,
                federation_sha256=FEDERATION_SHA256,
                round_id=ROUND,
                recipient=bad,
                survivors=(),
                dropped=(),
                consistency=(),
            )


def test_site_id_with_a_trailing_newline_refused_in_a_message() -> None:
    """``re.match`` with ``$`` would accept ``'st-mary\\n'``; identifiers are matched whole."""
    keys, roster = make_keys(["st-mary"])
    roster = {**roster, "st-mary\n": ROSTER["a"]}  # a roster entry only the attacker would add
    assert is_valid_identifier("st-mary") and not is_valid_identifier("st-mary\n")
    good = dataclasses.replace(site_messages()[2], site_id="st-mary")
    data = encode_site_message(good, keys["st-mary"])
    forged = data.replace(b"\x00\x07st-mary", b"\x00\x08st-mary\n", 1)
    forged = forged[:-65] + b"\xff" + crypto.sign(KEYS["a"], signature_payload(forged[:-65]))
    with pytest.raises(MalformedMessageError):
        decode_site(forged, roster=roster)
    with pytest.raises(ValueError):
        dataclasses.replace(good, site_id="st-mary\n")
    request = encode_coordinator_message(coordinator_messages()[2])
    survivors = request.replace(b"\x00\x01a\x00\x01b", b"\x00\x01a\x00\x02b\n", 1)
    with pytest.raises(MalformedMessageError):
        decode_coordinator(survivors)


def test_message_bound_to_another_federation_file_rejected() -> None:
    other = bytes(32)
    for message in site_messages():
        data = encode_site_message(message, KEYS["a"])
        with pytest.raises(WrongFederationError, match="SHA-256"):
            decode_site(data, federation_sha256=other)
    for message in coordinator_messages():
        with pytest.raises(WrongFederationError, match="SHA-256"):
            decode_coordinator(encode_coordinator_message(message), federation_sha256=other)
    with pytest.raises(ValueError):
        dataclasses.replace(coordinator_messages()[0], federation_sha256=b"short")


def test_consistency_messages_refuse_non_canonical_sets() -> None:
    with pytest.raises(ValueError):
        BlockSurvivors("fusion", ("b", "a"))
    with pytest.raises(ValueError):
        BlockSurvivors("fusion", ())
    with pytest.raises(ValueError):
        BlockSurvivors("head.mortality", ("a",))
    with pytest.raises(ValueError):
        BlockSignatures("fusion", (SiteSignature("a", bytes(64)), SiteSignature("a", bytes(64))))
    with pytest.raises(ValueError):
        encode_site_message(
            dataclasses.replace(site_messages()[4], signatures=(BlockSignature("fusion", bytes(63)),)), KEYS["a"]
        )


def test_head_blocks_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        BlockKeys("head.mortality", bytes(32), bytes(32))


def test_wrong_context_rejected() -> None:
    data = encode_coordinator_message(coordinator_messages()[2])
    with pytest.raises(WrongFederationError):
        decode_coordinator(data, federation_id="other")
    with pytest.raises(WrongRoundError):
        decode_coordinator(data, round_id=ROUND + 1)
    with pytest.raises(WrongRecipientError):
        decode_coordinator(data, recipient="a")


def test_site_message_checks_sender_then_signature_then_context() -> None:
    data = encode_site_message(site_messages()[0], KEYS["a"])
    with pytest.raises(UnknownSenderError):
        decode_site(data, roster={"b": ROSTER["b"]})
    with pytest.raises(AuthenticationError):
        decode_site(data, roster={"a": ROSTER["b"]})
    with pytest.raises(WrongRoundError):
        decode_site(data, round_id=ROUND + 1)
    with pytest.raises(AuthenticationError):
        decode_site(data[:-65])
    with pytest.raises(MalformedMessageError):
        decode_site(encode_coordinator_message(coordinator_messages()[0]))
    with pytest.raises(MalformedMessageError):
        decode_coordinator(data)


def test_encoders_refuse_the_wrong_direction() -> None:
    with pytest.raises(TypeError):
        encode_site_message(coordinator_messages()[0], KEYS["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_coordinator_message(site_messages()[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_share_plaintext(site_messages()[0])  # type: ignore[arg-type]


def _real_messages() -> list[bytes]:
    federation = Federation()
    federation.run()
    return [
        *federation.adverts.values(),
        *federation.bundles.values(),
        *federation.shares.values(),
        *federation.deliveries.values(),
        *federation.masked.values(),
        *federation.unmask_requests.values(),
        *federation.responses.values(),
    ]


REAL = _real_messages()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(REAL) - 1), data=st.data())
def test_fuzzed_messages_raise_only_protocol_errors(index: int, data: st.DataObject) -> None:
    message = bytearray(REAL[index])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, max(len(message) - 1, 0)))
        if action == "flip" and message:
            message[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del message[position : position + data.draw(st.integers(1, 8))]
        else:
            message[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    untrusted = bytes(message)
    for decoder in (decode_site, lambda m: decode_coordinator(m, recipient="s0")):
        with contextlib.suppress(ProtocolError):
            decoder(untrusted)


def test_message_types_are_stable() -> None:
    assert [t.value for t in MessageType] == list(range(1, 11))
    assert MessageType.CONSISTENCY_REQUEST == 9 and MessageType.CONSISTENCY_RESPONSE == 10
