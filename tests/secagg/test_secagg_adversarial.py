"""Adversarial tests, one per attack, named after it.

"Coordinator" attacks hand a site crafted coordinator messages; "site" attacks hand the
coordinator crafted (validly signed, where the attacker is a roster member) site messages.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, ROUND, Federation, make_keys

from blossom_secure import crypto
from blossom_secure.errors import ProtocolError
from blossom_secure.secagg import (
    AllZeroSharedSecretError,
    BothSharesRequestedError,
    ConsistencyCheckError,
    DuplicatePublicKeyError,
    InconsistentMessageError,
    MalformedMessageError,
    MessageTooLargeError,
    ReplayedMessageError,
    SecAggParams,
    StageOrderError,
    UnknownSenderError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)
from blossom_secure.secagg.errors import AuthenticationError
from blossom_secure.secagg.messages import (
    EncryptedShare,
    KeyBundle,
    MaskedBlock,
    ShareKind,
    decode_coordinator_message,
    decode_site_message,
    encode_coordinator_message,
    encode_site_message,
)

LOW_ORDER_POINT = bytes(32)  # the X25519 point 0: every agreement with it is all zero


def decode_from_site(federation: Federation, data: bytes):
    return decode_site_message(
        data,
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=federation.round_id,
        roster=federation.roster,
        max_bytes=1 << 24,
    )


def decode_for(federation: Federation, site: str, data: bytes):
    return decode_coordinator_message(
        data,
        federation_id=FEDERATION,
        federation_sha256=FEDERATION_SHA256,
        round_id=federation.round_id,
        recipient=site,
        max_bytes=1 << 24,
    )


def resign(federation: Federation, data: bytes, signer: str | None = None, **changes: object) -> bytes:
    """A site message re-encoded with ``changes`` and signed by ``signer`` (its sender by
    default): what a malicious roster member can produce."""
    message = dataclasses.replace(decode_from_site(federation, data), **changes)
    return encode_site_message(message, federation.keys[signer or message.site_id])


def recode(federation: Federation, site: str, data: bytes, **changes: object) -> bytes:
    """A coordinator message re-encoded with ``changes``: what a malicious coordinator sends."""
    return encode_coordinator_message(dataclasses.replace(decode_for(federation, site, data), **changes))


# ------------------------------------------------------------ replay and order


def test_replayed_advertisement_rejected(federation: Federation) -> None:
    advert = federation.sites["s0"].advertise_keys()
    federation.coordinator.receive(advert)
    with pytest.raises(ReplayedMessageError):
        federation.coordinator.receive(advert)


def test_replayed_advertisement_from_previous_round_rejected(federation: Federation) -> None:
    old = federation.sites["s0"].advertise_keys()
    later = Federation(round_id=ROUND + 1, keys=(federation.keys, federation.roster))
    with pytest.raises(WrongRoundError):
        later.coordinator.receive(old)


def test_replayed_advertisement_in_key_bundle_rejected(federation: Federation) -> None:
    federation.advertise()
    second = federation.new_site("s1").advertise_keys()  # s1 signs a second advertisement
    bundle = recode(
        federation, "s0", federation.bundles["s0"], advertisements=tuple(sorted((*federation.adverts.values(), second)))
    )
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].share_keys(bundle)
    duplicated = decode_for(federation, "s0", federation.bundles["s0"])
    forged = KeyBundle.__new__(KeyBundle)
    for field in dataclasses.fields(KeyBundle):
        object.__setattr__(forged, field.name, getattr(duplicated, field.name))
    object.__setattr__(
        forged, "advertisements", (federation.adverts["s1"], federation.adverts["s1"], federation.adverts["s0"])
    )
    with pytest.raises(MalformedMessageError):
        federation.sites["s0"].share_keys(encode_coordinator_message(forged))


def test_replayed_key_bundle_rejected(federation: Federation) -> None:
    federation.advertise()
    federation.sites["s0"].share_keys(federation.bundles["s0"])
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].share_keys(federation.bundles["s0"])
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].advertise_keys()


def test_replayed_share_delivery_rejected(federation: Federation) -> None:
    federation.advertise()
    federation.share()
    federation.sites["s0"].masked_input(federation.deliveries["s0"])
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].masked_input(federation.deliveries["s0"])
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].masked_input(federation.bundles["s0"])


@pytest.mark.parametrize("stage", ["share", "mask", "check", "unmask"])
def test_replayed_site_message_rejected_by_coordinator(federation: Federation, stage: str) -> None:
    federation.advertise()
    if stage in ("mask", "check", "unmask"):
        federation.share()
    if stage in ("check", "unmask"):
        federation.mask()
    if stage == "unmask":
        federation.check()
    site = "s0"
    produce = {
        "share": lambda: federation.sites[site].share_keys(federation.bundles[site]),
        "mask": lambda: federation.sites[site].masked_input(federation.deliveries[site]),
        "check": lambda: federation.sites[site].consistency_check(federation.consistency_requests[site]),
        "unmask": lambda: federation.sites[site].unmask(federation.unmask_requests[site]),
    }[stage]
    message = produce()
    federation.coordinator.receive(message)
    with pytest.raises(ReplayedMessageError):
        federation.coordinator.receive(message)


def test_stage_out_of_order_rejected_by_coordinator(federation: Federation) -> None:
    federation.advertise(skip=("s3",))
    federation.share()
    federation.mask()
    late_advert = federation.sites["s3"].advertise_keys()
    with pytest.raises(StageOrderError):
        federation.coordinator.receive(late_advert)
    early = Federation()
    early.advertise()
    early.share()
    masked = early.sites["s0"].masked_input(early.deliveries["s0"])
    fresh = Federation(keys=(early.keys, early.roster))
    with pytest.raises(StageOrderError):
        fresh.coordinator.receive(masked)


def test_stage_out_of_order_rejected_by_site(federation: Federation) -> None:
    federation.advertise()
    federation.share()
    federation.mask()
    fresh = federation.new_site("s0")
    with pytest.raises(StageOrderError):
        fresh.share_keys(federation.bundles["s0"])
    fresh.advertise_keys()
    with pytest.raises(StageOrderError):
        fresh.share_keys(federation.consistency_requests["s0"])
    with pytest.raises(StageOrderError):
        fresh.masked_input(federation.deliveries["s0"])


# ---------------------------------------------------------------- context


def test_wrong_federation_rejected(federation: Federation) -> None:
    federation.advertise()
    other = federation.new_coordinator(federation_id="fed-other")
    with pytest.raises(WrongFederationError):
        other.receive(federation.adverts["s0"])
    with pytest.raises(WrongFederationError):
        federation.sites["s1"].share_keys(recode(federation, "s1", federation.bundles["s1"], federation_id="fed-other"))


def test_wrong_round_rejected_by_site(federation: Federation) -> None:
    federation.advertise()
    with pytest.raises(WrongRoundError):
        federation.sites["s1"].share_keys(recode(federation, "s1", federation.bundles["s1"], round_id=ROUND + 1))


def test_message_for_another_site_rejected(federation: Federation) -> None:
    federation.advertise()
    with pytest.raises(WrongRecipientError):
        federation.sites["s1"].share_keys(federation.bundles["s2"])


# ------------------------------------------------------------- signatures


def test_forged_advertisement_signature_rejected(federation: Federation) -> None:
    advert = bytearray(federation.sites["s0"].advertise_keys())
    advert[-1] ^= 1
    with pytest.raises(AuthenticationError):
        federation.coordinator.receive(bytes(advert))


def test_tampered_advertisement_body_rejected(federation: Federation) -> None:
    advert = bytearray(federation.sites["s0"].advertise_keys())
    advert[40] ^= 1
    with pytest.raises(AuthenticationError):
        federation.coordinator.receive(bytes(advert))


def test_missing_signature_rejected(federation: Federation) -> None:
    advert = federation.sites["s0"].advertise_keys()
    with pytest.raises(AuthenticationError):
        federation.coordinator.receive(advert[:-65])


def test_site_impersonating_another_site_rejected(federation: Federation) -> None:
    advert = federation.sites["s0"].advertise_keys()
    forged = resign(federation, advert, signer="s1")  # s1 signs a message that claims to be s0's
    with pytest.raises(AuthenticationError):
        federation.coordinator.receive(forged)


def test_forged_advertisement_in_key_bundle_rejected(federation: Federation) -> None:
    federation.advertise()
    other = bytearray(federation.adverts["s2"])
    other[-3] ^= 0x40
    bundle = recode(
        federation,
        "s0",
        federation.bundles["s0"],
        advertisements=tuple(sorted([*(a for s, a in federation.adverts.items() if s != "s2"), bytes(other)])),
    )
    with pytest.raises(AuthenticationError):
        federation.sites["s0"].share_keys(bundle)


def test_unknown_sender_rejected(federation: Federation) -> None:
    outsider_keys, outsider_roster = make_keys(["mallory"])
    outsider = Federation(
        {"mallory": ("fusion",), "s0": ("fusion",)},
        keys=({**federation.keys, **outsider_keys}, {**federation.roster, **outsider_roster}),
    )
    with pytest.raises(UnknownSenderError):
        federation.coordinator.receive(outsider.sites["mallory"].advertise_keys())


def test_advertisement_from_unknown_sender_in_key_bundle_rejected(federation: Federation) -> None:
    outsider_keys, outsider_roster = make_keys(["mallory"])
    outsider = Federation(
        {"mallory": ("fusion",), "s0": ("fusion",)},
        keys=({**federation.keys, **outsider_keys}, {**federation.roster, **outsider_roster}),
    )
    federation.advertise()
    bundle = recode(
        federation,
        "s0",
        federation.bundles["s0"],
        advertisements=tuple(sorted([*federation.adverts.values(), outsider.sites["mallory"].advertise_keys()])),
    )
    with pytest.raises(UnknownSenderError):
        federation.sites["s0"].share_keys(bundle)


# ------------------------------------------------------------------- keys


def test_duplicate_public_keys_across_sites_rejected(federation: Federation) -> None:
    first = federation.sites["s0"].advertise_keys()
    federation.coordinator.receive(first)
    copied_key = decode_from_site(federation, first).share_public_key
    copycat = resign(federation, federation.sites["s1"].advertise_keys(), share_public_key=copied_key)
    with pytest.raises(DuplicatePublicKeyError):
        federation.coordinator.receive(copycat)


def test_duplicate_public_keys_within_one_advertisement_rejected(federation: Federation) -> None:
    advert = federation.sites["s0"].advertise_keys()
    message = decode_from_site(federation, advert)
    same = resign(federation, advert, share_public_key=message.blocks[0].mask_public_key)
    with pytest.raises(DuplicatePublicKeyError):
        federation.coordinator.receive(same)


def test_duplicate_public_keys_in_key_bundle_rejected_by_site(federation: Federation) -> None:
    federation.advertise()
    copied = decode_from_site(federation, federation.adverts["s0"]).share_public_key
    copycat = resign(federation, federation.adverts["s1"], share_public_key=copied)
    adverts = tuple(sorted([copycat, *(a for s, a in federation.adverts.items() if s != "s1")]))
    with pytest.raises(DuplicatePublicKeyError):
        federation.sites["s2"].share_keys(recode(federation, "s2", federation.bundles["s2"], advertisements=adverts))


def test_low_order_public_key_rejected_by_coordinator(federation: Federation) -> None:
    weak = resign(federation, federation.sites["s0"].advertise_keys(), share_public_key=LOW_ORDER_POINT)
    with pytest.raises(AllZeroSharedSecretError):
        federation.coordinator.receive(weak)


def test_all_zero_shared_secret_rejected_by_site(federation: Federation) -> None:
    federation.advertise()
    weak = resign(federation, federation.adverts["s1"], share_public_key=LOW_ORDER_POINT)
    adverts = tuple(sorted([weak, *(a for s, a in federation.adverts.items() if s != "s1")]))
    with pytest.raises(AllZeroSharedSecretError):
        federation.sites["s0"].share_keys(recode(federation, "s0", federation.bundles["s0"], advertisements=adverts))


def test_all_zero_mask_agreement_rejected_by_site(federation: Federation) -> None:
    federation.advertise()
    message = decode_from_site(federation, federation.adverts["s1"])
    blocks = tuple(
        dataclasses.replace(b, mask_public_key=LOW_ORDER_POINT) if b.block == "fusion" else b for b in message.blocks
    )
    weak = resign(
        federation, federation.adverts["s1"], blocks=blocks
    )  # s1 is malicious, the coordinator lets it through
    adverts = tuple(sorted([weak, *(a for s, a in federation.adverts.items() if s != "s1")]))
    for site in federation.sites:
        bundle = federation.bundles[site]
        if site == "s0":
            bundle = recode(federation, "s0", bundle, advertisements=adverts)
        federation.coordinator.receive(federation.sites[site].share_keys(bundle))
    deliveries = federation.coordinator.close_stage()
    with pytest.raises(AllZeroSharedSecretError):
        federation.sites["s0"].masked_input(deliveries["s0"])


# ------------------------------------------------------------- ciphertexts


def deliveries_after_sharing(federation: Federation) -> None:
    federation.advertise()
    federation.share()


def test_tampered_share_ciphertext_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    first = delivery.shares[0]
    broken = bytearray(first.ciphertext)
    broken[5] ^= 1
    shares = (EncryptedShare(first.peer, first.nonce, bytes(broken)), *delivery.shares[1:])
    with pytest.raises(AuthenticationError):
        federation.sites["s0"].masked_input(recode(federation, "s0", federation.deliveries["s0"], shares=shares))


def test_tampered_share_nonce_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    first = delivery.shares[0]
    shares = (EncryptedShare(first.peer, bytes(12), first.ciphertext), *delivery.shares[1:])
    with pytest.raises(AuthenticationError):
        federation.sites["s0"].masked_input(recode(federation, "s0", federation.deliveries["s0"], shares=shares))


def test_share_ciphertext_redirected_to_another_recipient_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    for_s1 = {s.peer: s for s in decode_for(federation, "s1", federation.deliveries["s1"]).shares}
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    shares = tuple(
        for_s1["s2"] if s.peer == "s2" else s for s in delivery.shares
    )  # s2's ciphertext for s1, given to s0
    with pytest.raises(AuthenticationError):
        federation.sites["s0"].masked_input(recode(federation, "s0", federation.deliveries["s0"], shares=shares))


def test_share_ciphertext_with_swapped_sender_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    by_peer = {s.peer: s for s in delivery.shares}
    shares = (
        EncryptedShare("s1", by_peer["s2"].nonce, by_peer["s2"].ciphertext),
        EncryptedShare("s2", by_peer["s1"].nonce, by_peer["s1"].ciphertext),
        by_peer["s3"],
    )
    with pytest.raises(AuthenticationError):
        federation.sites["s0"].masked_input(recode(federation, "s0", federation.deliveries["s0"], shares=shares))


def test_share_delivery_missing_a_share_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].masked_input(
            recode(federation, "s0", federation.deliveries["s0"], shares=delivery.shares[1:])
        )


def test_share_delivery_omitting_the_recipient_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].masked_input(
            recode(federation, "s0", federation.deliveries["s0"], share_senders=("s1", "s2", "s3"))
        )


def test_share_delivery_naming_unknown_sender_rejected(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    senders = ("s0", "s1", "s2", "s3", "zed")
    with pytest.raises(UnknownSenderError):
        federation.sites["s0"].masked_input(
            recode(federation, "s0", federation.deliveries["s0"], share_senders=senders)
        )


def test_rejected_message_changes_nothing(federation: Federation) -> None:
    deliveries_after_sharing(federation)
    delivery = decode_for(federation, "s0", federation.deliveries["s0"])
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].masked_input(
            recode(federation, "s0", federation.deliveries["s0"], shares=delivery.shares[1:])
        )
    assert federation.sites["s0"].stage == "share_keys"
    federation.mask()
    federation.check()
    federation.unmask()
    assert federation.coordinator.results()["fusion"].failure is None


# --------------------------------------------------------------- unmasking


def unmask_ready(federation: Federation, skip: tuple[str, ...] = ("s3",)) -> None:
    federation.advertise()
    federation.share()
    federation.mask(skip=skip)
    federation.check()


def test_coordinator_requests_both_shares_of_one_peer_refused(federation: Federation) -> None:
    unmask_ready(federation)
    request = recode(
        federation, "s0", federation.unmask_requests["s0"], survivors=("s0", "s1", "s2", "s3"), dropped=("s3",)
    )
    with pytest.raises(BothSharesRequestedError):
        federation.sites["s0"].unmask(request)


def test_second_unmask_request_refused_even_with_another_partition(federation: Federation) -> None:
    unmask_ready(federation, skip=())
    federation.sites["s0"].unmask(federation.unmask_requests["s0"])  # reveals seed shares of all four
    other = recode(federation, "s0", federation.unmask_requests["s0"], survivors=("s0", "s1", "s2"), dropped=("s3",))
    with pytest.raises(BothSharesRequestedError):
        federation.sites["s0"].unmask(other)  # would reveal s3's mask-key share as well
    with pytest.raises(ReplayedMessageError):
        federation.sites["s0"].unmask(federation.unmask_requests["s0"])


def test_unmask_request_omitting_a_peer_refused(federation: Federation) -> None:
    unmask_ready(federation)
    request = recode(federation, "s0", federation.unmask_requests["s0"], dropped=())
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].unmask(request)


def test_unmask_request_not_counting_the_recipient_as_survivor_refused(federation: Federation) -> None:
    unmask_ready(federation)
    request = recode(federation, "s0", federation.unmask_requests["s0"], survivors=("s1", "s2"), dropped=("s0", "s3"))
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].unmask(request)


def test_unmask_request_shrinking_the_group_below_threshold_refused(federation: Federation) -> None:
    unmask_ready(federation, skip=())
    request = recode(federation, "s0", federation.unmask_requests["s0"], survivors=("s0", "s1"), dropped=("s2", "s3"))
    with pytest.raises(ConsistencyCheckError):  # s0 signed {s0, s1, s2, s3}, not {s0, s1}
        federation.sites["s0"].unmask(request)


def test_survivor_never_reveals_both_shares_of_a_peer(federation: Federation) -> None:
    unmask_ready(federation)
    for site, request in federation.unmask_requests.items():
        response = decode_from_site(federation, federation.sites[site].unmask(request))
        kinds: dict[tuple[str, str], set] = {}
        for share in response.shares:
            kinds.setdefault((share.peer, share.block), set()).add(share.kind)
        assert all(len(k) == 1 for k in kinds.values())
        assert {(p, b) for (p, b), k in kinds.items() if ShareKind.MASK_KEY in k} == {
            ("s3", "encoder.image"),
            ("s3", "fusion"),
        }


def test_corrupted_unmask_share_fails_the_block_instead_of_a_wrong_sum(federation: Federation) -> None:
    unmask_ready(federation, skip=())
    for site, request in federation.unmask_requests.items():
        response = federation.sites[site].unmask(request)
        if site == "s0":  # a malicious survivor alters one of its revealed shares
            message = decode_from_site(federation, response)
            shares = tuple(
                dataclasses.replace(s, value=(int.from_bytes(s.value, "big") ^ 1).to_bytes(66, "big"))
                if (s.peer, s.block) == ("s1", "fusion")
                else s
                for s in message.shares
            )
            response = resign(federation, response, shares=shares)
        federation.coordinator.receive(response)
    federation.coordinator.close_stage()
    results = federation.coordinator.results()
    assert results["fusion"].weighted_sum is None and "share verification failed" in results["fusion"].failure
    assert results["encoder.image"].failure is None


def test_corrupted_mask_key_share_fails_the_block(federation: Federation) -> None:
    unmask_ready(federation)
    for site, request in federation.unmask_requests.items():
        response = federation.sites[site].unmask(request)
        if site == "s0":
            message = decode_from_site(federation, response)
            shares = tuple(
                dataclasses.replace(s, value=bytes(66)) if s.kind is ShareKind.MASK_KEY and s.block == "fusion" else s
                for s in message.shares
            )
            response = resign(federation, response, shares=shares)
        federation.coordinator.receive(response)
    federation.coordinator.close_stage()
    assert "mask key of s3" in federation.coordinator.results()["fusion"].failure


def test_unmask_response_revealing_other_shares_rejected(federation: Federation) -> None:
    unmask_ready(federation)
    response = federation.sites["s0"].unmask(federation.unmask_requests["s0"])
    message = decode_from_site(federation, response)
    flipped = tuple(dataclasses.replace(s, kind=ShareKind.MASK_KEY) if s.peer == "s1" else s for s in message.shares)
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, response, shares=flipped))


def test_unmask_response_with_non_field_share_rejected(federation: Federation) -> None:
    unmask_ready(federation)
    response = federation.sites["s0"].unmask(federation.unmask_requests["s0"])
    message = decode_from_site(federation, response)
    shares = (dataclasses.replace(message.shares[0], value=b"\xff" * 66), *message.shares[1:])
    with pytest.raises(MalformedMessageError):
        federation.coordinator.receive(resign(federation, response, shares=shares))


def test_unmask_response_from_a_dropped_site_rejected(federation: Federation) -> None:
    unmask_ready(federation)
    response = federation.sites["s0"].unmask(federation.unmask_requests["s0"])
    with pytest.raises(UnknownSenderError):
        federation.coordinator.receive(resign(federation, response, signer="s3", site_id="s3"))


# ----------------------------------------------------------- site messages


def test_share_message_to_unexpected_recipients_rejected(federation: Federation) -> None:
    federation.advertise()
    shares = federation.sites["s0"].share_keys(federation.bundles["s0"])
    message = decode_from_site(federation, shares)
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, shares, shares=message.shares[:-1]))


def test_masked_input_with_wrong_length_rejected(federation: Federation) -> None:
    federation.advertise()
    federation.share()
    masked = federation.sites["s0"].masked_input(federation.deliveries["s0"])
    message = decode_from_site(federation, masked)
    blocks = (MaskedBlock(message.blocks[0].block, np.zeros(3, dtype="<u4")), *message.blocks[1:])
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, masked, blocks=blocks))
    wide = tuple(MaskedBlock(b.block, b.vector.astype("<u8")) for b in message.blocks)
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, masked, blocks=wide))
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, masked, blocks=message.blocks[:1]))


def test_masked_input_from_a_site_that_did_not_share_keys_rejected(federation: Federation) -> None:
    federation.advertise()
    federation.share(skip=("s3",))
    masked = federation.sites["s0"].masked_input(federation.deliveries["s0"])
    with pytest.raises(UnknownSenderError):
        federation.coordinator.receive(resign(federation, masked, signer="s3", site_id="s3"))


def test_advertisement_of_a_block_outside_the_layout_rejected(federation: Federation) -> None:
    advert = federation.sites["s0"].advertise_keys()
    message = decode_from_site(federation, advert)
    blocks = (
        *message.blocks,
        dataclasses.replace(
            message.blocks[0], block="encoder.secret", mask_public_key=crypto.generate_x25519_key_pair()[1]
        ),
    )
    with pytest.raises(InconsistentMessageError):
        federation.coordinator.receive(resign(federation, advert, blocks=tuple(sorted(blocks, key=lambda b: b.block))))


def test_key_bundle_omitting_the_sites_own_advertisement_rejected(federation: Federation) -> None:
    federation.advertise()
    adverts = tuple(sorted(a for s, a in federation.adverts.items() if s != "s0"))
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].share_keys(recode(federation, "s0", federation.bundles["s0"], advertisements=adverts))


def test_key_bundle_altering_the_sites_own_advertisement_rejected(federation: Federation) -> None:
    federation.advertise()
    substitute = federation.new_site("s0").advertise_keys()  # validly signed by s0, other keys
    adverts = tuple(sorted([substitute, *(a for s, a in federation.adverts.items() if s != "s0")]))
    with pytest.raises(InconsistentMessageError):
        federation.sites["s0"].share_keys(recode(federation, "s0", federation.bundles["s0"], advertisements=adverts))


# ------------------------------------------------------- sizes and garbage


def test_oversized_message_rejected(federation: Federation) -> None:
    limit = federation.params.max_message_bytes
    with pytest.raises(MessageTooLargeError):
        federation.coordinator.receive(b"BSSA" + bytes(limit))
    federation.sites["s0"].advertise_keys()
    with pytest.raises(MessageTooLargeError):
        federation.sites["s0"].share_keys(b"BSSA" + bytes(limit))


@pytest.mark.parametrize("garbage", [b"", b"hello", b"BSSA\x00\x01\x02", b"BSSA\x00\x01\x01" + bytes(100)])
def test_malformed_message_rejected(federation: Federation, garbage: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        federation.coordinator.receive(garbage)
    federation.sites["s0"].advertise_keys()
    with pytest.raises(MalformedMessageError):
        federation.sites["s0"].share_keys(garbage)


def test_coordinator_message_sent_to_coordinator_rejected(federation: Federation) -> None:
    federation.advertise()
    with pytest.raises(MalformedMessageError):
        federation.coordinator.receive(federation.bundles["s0"])


def test_site_message_sent_to_site_rejected(federation: Federation) -> None:
    advert = federation.sites["s1"].advertise_keys()
    federation.sites["s0"].advertise_keys()
    with pytest.raises(MalformedMessageError):
        federation.sites["s0"].share_keys(advert)


# ---------------------------------------------------------------- fuzzing

ROUNDS = Federation()
ROUNDS.advertise()
ROUNDS.share()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_deliveries_raise_only_protocol_errors_and_change_nothing(data: st.DataObject) -> None:
    original = ROUNDS.deliveries["s0"]
    message = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(message) - 1))
        message[position] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(message) != original)
    site = ROUNDS.sites["s0"]
    with pytest.raises(ProtocolError):
        site.masked_input(bytes(message))
    assert site.stage == "share_keys"


# ------------------------------------------------------------ group policy


def test_block_with_a_single_contributor_is_not_aggregated() -> None:
    federation = Federation({"s0": ("fusion", "encoder.tabular"), "s1": ("fusion",), "s2": ("fusion",)})
    results = federation.run()
    assert results["encoder.tabular"].weighted_sum is None
    assert results["encoder.tabular"].failure.startswith("fewer than min_contributors")
    assert "encoder.tabular" not in {b.block for b in decode_from_site(federation, federation.masked["s0"]).blocks}


def test_site_policy_minimum_withholds_its_block() -> None:
    federation = Federation({f"s{i}": ("fusion",) for i in range(4)}, minimums={"s3": 5})
    results = federation.run()
    assert results["fusion"].contributors == ("s0", "s1", "s2")
    assert decode_from_site(federation, federation.masked["s3"]).blocks == ()


def test_roster_larger_than_max_sites_refused() -> None:
    """Thresholds are a majority of max_sites; a larger roster could split into two
    disjoint sets that each reach t."""
    with pytest.raises(ValueError, match="max_group_size"):
        Federation({f"s{i}": ("fusion",) for i in range(4)}, params=SecAggParams(max_group_size=3, max_weight=10))


def test_block_group_larger_than_max_group_size_is_not_aggregated() -> None:
    from blossom_secure.secagg.groups import plan_blocks

    params = SecAggParams(max_group_size=3, max_weight=10)
    plan = plan_blocks({f"s{i}": ("fusion",) for i in range(4)}, {f"s{i}": 2 for i in range(4)}, params)
    assert "max_group_size" in plan.failures["fusion"]


def test_dropouts_shrinking_a_group_below_policy_minimum_stop_the_block() -> None:
    federation = Federation({f"s{i}": ("fusion",) for i in range(5)}, minimums={"s0": 4})
    federation.advertise()
    federation.share()
    federation.mask(skip=("s3", "s4"))  # 3 survivors < s0's minimum of 4
    federation.check()
    federation.unmask()
    assert federation.coordinator.results()["fusion"].failure.startswith("fewer than min_contributors survivors")
    assert all(decode_from_site(federation, r).shares == () for r in federation.responses.values())
