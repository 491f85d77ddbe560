"""The site's side of secure aggregation: an explicit stage machine over encoded messages.

Each method takes the untrusted bytes the coordinator sent and returns the bytes to send
back; nothing here does I/O, so the same machine runs in-process and under a deployment
runtime. A method that raises leaves the machine exactly as it was.

Stages (Bonawitz et al. 2017, section 4, malicious-server variant, extended to block
groups):

1. :meth:`SiteStageMachine.advertise_keys`: fresh X25519 keys (one to receive shares,
   one per contributed block for pairwise masks) and a 256-bit self-mask seed per block,
   committed to, all signed with the site's identity key.
2. :meth:`SiteStageMachine.share_keys`: verify every advertisement against the roster,
   form the block groups (refusing any group smaller than the block's public threshold,
   and any advertisement of a block by a site outside the block's public group),
   Shamir-share each block's mask private key and seed among its group with that
   threshold, and encrypt each neighbour's shares to it.
3. :meth:`SiteStageMachine.masked_input`: decrypt the shares received, then send each
   block's quantised, weighted update plus its self mask and its pairwise masks.
4. :meth:`SiteStageMachine.consistency_check`: sign, per block, the survivor set the
   coordinator claims; each site signs one set per block and round.
5. :meth:`SiteStageMachine.unmask`: with ``t_b`` valid signatures of group members over
   the set it signed, and a survivor/dropped split that agrees with it, reveal for each
   peer the share of its seed (it survived) or of its mask key (it dropped), never both.

The thresholds ``t_b`` and the public block groups ``P_b`` come from
:class:`SecAggParams` (the federation file, whose SHA-256 every message carries) and
never from what the coordinator shows. A site contributes only blocks whose public group
holds it, and refuses any group, survivor set or consistency signer outside ``P_b``.

For runtimes that start a process per message (Flower's ClientApp), the machine is saved
after each stage (:meth:`SiteStageMachine.export_state`, to the site's own folder, before
the stage's message leaves) and restored in the next process
(:meth:`SiteStageMachine.from_state`); a restored machine answers and refuses exactly as
the saved one would, and :meth:`SiteStageMachine.resend` sends the last answer again,
byte for byte, for a retry: never a second, different answer to a stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from blossom_secure import crypto
from blossom_secure.blocks import is_head, is_valid_block_name
from blossom_secure.crypto import Ed25519PrivateKey
from blossom_secure.errors import AuthenticationError, ProtocolError
from blossom_secure.secagg import kdf, shamir
from blossom_secure.secagg.errors import (
    AllZeroSharedSecretError,
    BothSharesRequestedError,
    ConsistencyCheckError,
    DuplicatePublicKeyError,
    InconsistentMessageError,
    MalformedMessageError,
    OutsideBlockGroupError,
    ReplayedMessageError,
    StageOrderError,
    UnknownSenderError,
)
from blossom_secure.secagg.groups import (
    BlockPlan,
    block_shortfall,
    neighbours,
    plan_blocks,
    round_graph_keys,
    share_x_coordinates,
    validate_block_sizes,
    validate_roster,
    verify_offer,
)
from blossom_secure.secagg.masking import masked_ring_vector
from blossom_secure.secagg.messages import (
    AdvertiseKeys,
    BlockKeys,
    BlockShares,
    BlockSignature,
    ConsistencyRequest,
    ConsistencyResponse,
    EncryptedShare,
    EncryptedShares,
    KeyBundle,
    MaskedBlock,
    MaskedInput,
    MaskStatement,
    MessageType,
    RevealedShare,
    ShareDelivery,
    ShareKind,
    SharePlaintext,
    SiteSignature,
    UnmaskRequest,
    UnmaskResponse,
    decode_coordinator_message,
    decode_advertisement_remembered,
    decode_share_plaintext,
    decode_site_message,
    encode_share_plaintext,
    encode_site_message,
    is_valid_identifier,
    peek_message_type,
)
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.quantize import check_weight, validate_update
from blossom_secure.secagg.site_state import (
    MAX_STATE_BYTES,
    STATE_STAGES,
    BlockSecret,
    HeldShare,
    SentMessage,
    SiteRoundState,
    SiteStateError,
    StageAlreadyAnsweredError,
    decode_site_state,
    encode_site_state,
    roster_sha256,
    terms_sha256,
)

__all__ = [
    "STAGE_NAMES",
    "SiteContribution",
    "SiteStageMachine",
    "mask_block",
]

logger = logging.getLogger(__name__)

#: The protocol's stages, in order (the names ``drop_after`` and logs use).
STAGE_NAMES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")
_SEED_BYTES = 32


@dataclass(frozen=True)
class SiteContribution:
    """What one site puts into a round.

    Args:
        blocks: Block name to the float32 1-D update of that block (for example new
            parameters minus global parameters). Never a task head.
        weight: The site's sample count, ``1..params.max_weight``.
        min_contributors: The site's policy minimum: it withholds any block whose group
            (known after advertising) is smaller.

    Raises:
        TypeError: an update is not a float32 numpy array.
        ValueError: a bad block name (or a head), update shape, NaN/inf, weight or minimum.

    Notes:
        The arrays are not copied; they must not change until the round ends.
    """

    blocks: Mapping[str, np.ndarray]
    weight: int
    min_contributors: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, Mapping):
            raise TypeError("blocks must be a mapping of block name to update")
        for block, update in self.blocks.items():
            if not is_valid_block_name(block) or is_head(block):
                raise ValueError(f"{block!r} is not a shareable block (task heads never leave the site)")
            validate_update(update, name=block)
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or self.weight < 1:
            raise ValueError("weight must be an int >= 1")
        if (
            not isinstance(self.min_contributors, int)
            or isinstance(self.min_contributors, bool)
            or not 1 <= self.min_contributors <= 0xFFFF
        ):
            raise ValueError("min_contributors must be an int in 1..65535")
        object.__setattr__(self, "blocks", MappingProxyType(dict(self.blocks)))


class _Stage(IntEnum):
    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    CHECKED = 4
    DONE = 5


_CoordinatorMessageT = TypeVar(
    "_CoordinatorMessageT", KeyBundle, ShareDelivery, ConsistencyRequest, UnmaskRequest
)
_SiteMessageT = TypeVar("_SiteMessageT", AdvertiseKeys, EncryptedShares, ConsistencyResponse, UnmaskResponse)

#: The coordinator message each stage expects (the stage that must be done before it).
_EXPECTED = {
    MessageType.KEY_BUNDLE: _Stage.ADVERTISED,
    MessageType.SHARE_DELIVERY: _Stage.SHARED,
    MessageType.CONSISTENCY_REQUEST: _Stage.MASKED,
    MessageType.UNMASK_REQUEST: _Stage.CHECKED,
}


@dataclass
class _BlockSecrets:
    mask_private_key: bytes
    mask_public_key: bytes
    seed: bytes
    commitment: bytes


@dataclass
class _SharedState:
    plan: BlockPlan
    adverts: dict[str, AdvertiseKeys]
    own_shares: dict[str, tuple[int, int]]  # block -> (mask key share, seed share) held for itself
    signed_adverts: tuple[bytes, ...]  # the advertisements accepted, as signed (kept for export_state)


@dataclass
class _MaskedState:
    share_senders: frozenset[str]
    held: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (peer, block) -> shares
    mask_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # blocks actually sent
    signed: dict[str, tuple[str, ...]] = field(default_factory=dict)  # block -> survivor set signed


def mask_block(
    update: np.ndarray,
    *,
    weight: int,
    params: SecAggParams,
    federation_id: str,
    round_id: int,
    block: str,
    site_id: str,
    seed: bytes,
    mask_private_key: bytes,
    peer_mask_public_keys: Mapping[str, bytes],
) -> np.ndarray:
    """One site's masked ring vector for one block.

    Derives the self-mask key from ``seed`` and one pairwise key per peer from the X25519
    agreement of ``mask_private_key`` with the peer's public key, then quantises and masks
    in one pass (:func:`blossom_secure.secagg.masking.masked_ring_vector`).

    Raises:
        AllZeroSharedSecretError: a peer's key is a low-order point.
        ValueError: a bad update or weight.

    Notes:
        The lower site id of a pair adds ``PRG(k_uv)``, the higher subtracts it, so pairwise
        masks cancel in the group's sum; the self mask ``PRG(b_u)`` protects the input of a
        site that is slow rather than gone (Bonawitz et al. 2017, section 4).
    """
    masks = [(kdf.self_mask_key(seed, federation_id=federation_id, round_id=round_id, block=block, site=site_id), 1)]
    peers = sorted(peer_mask_public_keys)
    secrets = _agree(mask_private_key, [peer_mask_public_keys[peer] for peer in peers])
    for peer, secret in zip(peers, secrets, strict=True):
        key = kdf.pairwise_mask_key(
            secret, federation_id=federation_id, round_id=round_id, block=block, sites=(site_id, peer)
        )
        masks.append((key, 1 if site_id < peer else -1))
    return masked_ring_vector(update, weight=weight, params=params, masks=masks)


def _agree(private_key: bytes, peer_public_keys: list[bytes]) -> list[bytes]:
    """The X25519 agreements with each peer key, the private key loaded once."""
    try:
        return crypto.x25519_shared_secrets(private_key, peer_public_keys)
    except crypto.LowOrderPointError:
        raise AllZeroSharedSecretError("X25519 agreement with a peer's key is all zero") from None


class SiteStageMachine:
    """One site's participation in one secure-aggregation round.

    Args:
        site_id: This site's id (in ``roster``).
        federation_id: The federation's id.
        federation_sha256: The SHA-256 (32 bytes) of the federation file, bound into every
            message, share encryption and consistency signature of the round.
        round_id: The round.
        roster: Site id to raw Ed25519 public key, distributed out of band; at most
            ``params.max_group_size`` sites.
        identity_key: This site's long-term Ed25519 private key (matches the roster).
        block_sizes: The federation's layout: block name to number of float32 values.
        params: The round's protocol parameters.
        contribution: This site's updates, weight and policy minimum.

    Raises:
        ValueError: inconsistent arguments (unknown site, key not matching the roster,
            a roster larger than ``params.max_group_size``, a federation hash that is not
            32 bytes, update sizes not matching the layout, weight above
            ``params.max_weight``, or a contribution to a block whose public group
            ``params.block_group(block)`` does not hold this site).

    Notes:
        A site never trusts the coordinator with a secret: shares travel encrypted to
        their recipients, and the only secrets it reveals are the shares the protocol
        needs, one kind per peer over the whole round (Bonawitz et al. 2017, section 4).
        Nor does it trust the coordinator's view of the round: thresholds are public,
        and it reveals shares only for a survivor set that ``t_b`` group members signed.
        A roster larger than ``params.max_group_size`` is refused because the thresholds
        are a majority of that bound: more sites could form two disjoint signing sets.
        For a block with a declared group ``P_b`` the bound is ``|P_b|`` instead, which
        holds only if no site outside ``P_b`` ever contributes, is grouped with, or
        signs for the block: this machine refuses to contribute such a block itself
        (before advertising anything) and refuses any message that puts an outsider
        there.
    """

    def __init__(
        self,
        *,
        site_id: str,
        federation_id: str,
        federation_sha256: bytes,
        round_id: int,
        roster: Mapping[str, bytes],
        identity_key: Ed25519PrivateKey,
        block_sizes: Mapping[str, int],
        params: SecAggParams,
        contribution: SiteContribution,
    ) -> None:
        if not isinstance(contribution, SiteContribution):
            raise TypeError("contribution must be a SiteContribution")
        self._bind(
            site_id=site_id,
            federation_id=federation_id,
            federation_sha256=federation_sha256,
            round_id=round_id,
            roster=roster,
            identity_key=identity_key,
            block_sizes=block_sizes,
            params=params,
            contribution=contribution,
        )

    def _bind(
        self,
        *,
        site_id: str,
        federation_id: str,
        federation_sha256: bytes,
        round_id: int,
        roster: Mapping[str, bytes],
        identity_key: Ed25519PrivateKey,
        block_sizes: Mapping[str, int],
        params: SecAggParams,
        contribution: SiteContribution | None,
    ) -> None:
        """Check the round's terms (and the contribution, if any) and start at stage new;
        shared by the constructor and :meth:`from_state`."""
        validate_roster(roster)
        validate_block_sizes(block_sizes)
        if not is_valid_identifier(federation_id):
            raise ValueError("federation_id is not a valid identifier")
        if not isinstance(federation_sha256, bytes) or len(federation_sha256) != kdf.FEDERATION_SHA256_BYTES:
            raise ValueError("federation_sha256 must be the 32-byte SHA-256 of the federation file")
        if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id < 1 << 64:
            raise ValueError("round_id must be an int in 0..2**64-1")
        if len(roster) > params.max_group_size:
            raise ValueError(
                f"the roster has {len(roster)} sites, more than max_group_size ({params.max_group_size}, the "
                "federation's max_sites): its thresholds would no longer be a majority of the sites"
            )
        if site_id not in roster:
            raise ValueError(f"site {site_id!r} is not in the roster")
        if crypto.identity_public_key(identity_key) != roster[site_id]:
            raise ValueError(f"identity key of {site_id} does not match the roster")
        if contribution is not None:
            for block, update in contribution.blocks.items():
                if block not in block_sizes:
                    raise ValueError(f"block {block} is not in the federation layout")
                validate_update(update, name=block, size=block_sizes[block])
                if not params.is_group_member(block, site_id):
                    raise ValueError(
                        f"site {site_id!r} is not in the public group of block {block} (the federation file's "
                        "[aggregation.groups]): it may not contribute it"
                    )
            check_weight(contribution.weight, params)
        self._site_id = site_id
        self._federation_id = federation_id
        self._federation_sha256 = federation_sha256
        self._round_id = round_id
        self._roster = dict(roster)
        self._identity_key = identity_key
        self._block_sizes = dict(block_sizes)
        self._params = params
        self._contribution = contribution
        self._contribution_digest: bytes | None = None
        self._x = share_x_coordinates(self._roster)
        self._graph_keys = round_graph_keys(
            federation_id=federation_id, federation_sha256=federation_sha256, round_id=round_id
        )
        self._stage = _Stage.NEW
        self._advertisement = b""
        self._share_private_key = b""
        self._secrets: dict[str, _BlockSecrets] = {}
        self._shared: _SharedState | None = None
        self._masked: _MaskedState | None = None
        self._revealed: dict[tuple[str, str], ShareKind] = {}  # (peer, block) -> kind revealed this round
        self._last_blocks: tuple[str, ...] = ()
        self._sent: list[SentMessage] = []  # one record per stage answered, in order

    @property
    def site_id(self) -> str:
        """This site's id."""
        return self._site_id

    @property
    def last_message_blocks(self) -> tuple[str, ...]:
        """The blocks the last message this machine produced is about (for the audit log):
        the blocks advertised, then those shared, masked, signed, and unmasked."""
        return self._last_blocks

    @property
    def stage(self) -> str:
        """The last stage completed (``"new"``, then a name from :data:`STAGE_NAMES`)."""
        return "new" if self._stage is _Stage.NEW else STAGE_NAMES[self._stage - 1]

    # ----------------------------------------------------------------- stage 1

    def advertise_keys(self) -> bytes:
        """Stage 1: make this round's keys and seeds and return the signed advertisement.

        Raises:
            ReplayedMessageError: keys were already advertised this round.
        """
        self._require_stage(_Stage.NEW, "advertise_keys")
        contribution = self._require_contribution()
        share_private_key, share_public_key = crypto.generate_x25519_key_pair()
        secrets_by_block: dict[str, _BlockSecrets] = {}
        for block in sorted(contribution.blocks):
            private_key, public_key = crypto.generate_x25519_key_pair()
            seed = os.urandom(_SEED_BYTES)
            commitment = kdf.seed_commitment(
                seed, federation_id=self._federation_id, round_id=self._round_id, block=block, site=self._site_id
            )
            secrets_by_block[block] = _BlockSecrets(private_key, public_key, seed, commitment)
        message = AdvertiseKeys(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            share_public_key=share_public_key,
            min_contributors=contribution.min_contributors,
            blocks=tuple(BlockKeys(b, s.mask_public_key, s.commitment) for b, s in secrets_by_block.items()),
        )
        encoded = encode_site_message(message, self._identity_key)
        self._share_private_key = share_private_key
        self._secrets = secrets_by_block
        self._advertisement = encoded
        self._last_blocks = tuple(secrets_by_block)
        self._record_sent(_Stage.ADVERTISED, None, encoded)
        self._stage = _Stage.ADVERTISED
        logger.info(
            "site %s advertised keys for round %d (%d blocks)", self._site_id, self._round_id, len(secrets_by_block)
        )
        return encoded

    # ----------------------------------------------------------------- stage 2

    def share_keys(self, untrusted_key_bundle: bytes) -> bytes:
        """Stage 2: verify the advertisements, form the block groups, and return the
        encrypted shares for every neighbour.

        Raises:
            StageOrderError: not the message this stage expects, or keys not advertised.
            ReplayedMessageError: a bundle was already processed, or it holds two
                advertisements from one site.
            MalformedMessageError: (and subclasses) a malformed bundle or advertisement.
            WrongFederationError, WrongRoundError, WrongRecipientError: wrong context.
            UnknownSenderError: an advertisement from a site outside the roster.
            AuthenticationError: an advertisement's signature does not verify.
            InconsistentMessageError: this site's own advertisement is missing or
                altered, or a block outside the layout is advertised.
            OutsideBlockGroupError: an advertisement of a block by a site outside the
                block's public group (a group with an outsider is never formed).
            DuplicatePublicKeyError: two advertised public keys are equal.
            AllZeroSharedSecretError: a neighbour's share key is a low-order point.
        """
        bundle = self._decode(untrusted_key_bundle, KeyBundle)
        adverts = self._verify_advertisements(bundle.advertisements)
        plan = plan_blocks(
            {s: [b.block for b in a.blocks] for s, a in adverts.items()},
            {s: a.min_contributors for s, a in adverts.items()},
            self._params,
            graph_keys=self._graph_keys,
        )
        own_shares, ciphertexts = self._make_shares(plan, adverts)
        message = EncryptedShares(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            shares=tuple(ciphertexts),
        )
        encoded = encode_site_message(message, self._identity_key)
        self._shared = _SharedState(plan, adverts, own_shares, bundle.advertisements)
        self._last_blocks = plan.blocks_of(self._site_id)
        self._record_sent(_Stage.SHARED, untrusted_key_bundle, encoded)
        self._stage = _Stage.SHARED
        logger.info(
            "site %s shared keys with %d neighbours in round %d (aggregating %s)",
            self._site_id,
            len(ciphertexts),
            self._round_id,
            ", ".join(plan.blocks_of(self._site_id)) or "nothing",
        )
        return encoded

    def _verify_advertisements(self, untrusted_adverts: Iterable[bytes]) -> dict[str, AdvertiseKeys]:
        adverts: dict[str, AdvertiseKeys] = {}
        own_seen = False
        for untrusted_advert in untrusted_adverts:
            advert = decode_advertisement_remembered(
                untrusted_advert,
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                roster=self._roster,
                max_bytes=self._params.max_message_bytes,
            )
            if not isinstance(advert, AdvertiseKeys):
                raise MalformedMessageError("key bundle holds a message that is not an advertisement")
            if advert.site_id in adverts:
                raise ReplayedMessageError(f"key bundle holds two advertisements from {advert.site_id}")
            for entry in advert.blocks:
                if entry.block not in self._block_sizes:
                    raise InconsistentMessageError(
                        f"{advert.site_id} advertised block {entry.block} outside the layout"
                    )
            verify_offer(advert.site_id, (entry.block for entry in advert.blocks), self._params)
            if advert.site_id == self._site_id:
                if untrusted_advert != self._advertisement:
                    raise InconsistentMessageError("key bundle alters this site's advertisement")
                own_seen = True
            adverts[advert.site_id] = advert
        if not own_seen:
            raise InconsistentMessageError("key bundle lacks this site's advertisement")
        _check_distinct_keys(adverts.values())
        return adverts

    def _make_shares(
        self, plan: BlockPlan, adverts: Mapping[str, AdvertiseKeys]
    ) -> tuple[dict[str, tuple[int, int]], list[EncryptedShare]]:
        per_holder: dict[str, list[BlockShares]] = {}
        own_shares: dict[str, tuple[int, int]] = {}
        for block in plan.blocks_of(self._site_id):
            holders = tuple(sorted((self._site_id, *plan.block_neighbours(block, self._site_id))))
            xs = [self._x[h] for h in holders]
            secret = self._secrets[block]
            threshold = plan.share_thresholds[block]
            key_shares = shamir.split(secret.mask_private_key, threshold=threshold, xs=xs)
            seed_shares = shamir.split(secret.seed, threshold=threshold, xs=xs)
            for holder, key_share, seed_share in zip(holders, key_shares, seed_shares, strict=True):
                if holder == self._site_id:
                    own_shares[block] = (key_share, seed_share)
                else:
                    entry = BlockShares(block, shamir.share_to_bytes(key_share), shamir.share_to_bytes(seed_share))
                    per_holder.setdefault(holder, []).append(entry)
        ciphertexts = []
        peers = neighbours(self._site_id, plan)
        share_secrets = _agree(self._share_private_key, [adverts[peer].share_public_key for peer in peers])
        for peer, share_secret in zip(peers, share_secrets, strict=True):
            plaintext = SharePlaintext(
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                sender=self._site_id,
                recipient=peer,
                blocks=tuple(per_holder[peer]),
            )
            key = self._share_key(share_secret, sender=self._site_id, recipient=peer)
            nonce = os.urandom(crypto.AEAD_NONCE_BYTES)
            associated = kdf.share_associated_data(
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                sender=self._site_id,
                recipient=peer,
            )
            ciphertexts.append(
                EncryptedShare(
                    peer, nonce, crypto.aead_encrypt(key, nonce, encode_share_plaintext(plaintext), associated)
                )
            )
        return own_shares, ciphertexts

    def _share_key(self, secret: bytes, *, sender: str, recipient: str) -> bytes:
        return kdf.share_encryption_key(
            secret, federation_id=self._federation_id, round_id=self._round_id, sender=sender, recipient=recipient
        )

    # ----------------------------------------------------------------- stage 3

    def masked_input(self, untrusted_share_delivery: bytes) -> bytes:
        """Stage 3: decrypt the shares addressed to this site and return the masked
        input of every block whose group still meets the threshold and minimums.

        Raises:
            StageOrderError: not the message this stage expects, or keys not shared.
            ReplayedMessageError: a share delivery was already processed.
            MalformedMessageError: (and subclasses) a malformed delivery or plaintext.
            WrongFederationError, WrongRoundError, WrongRecipientError: wrong context.
            UnknownSenderError: a share sender that did not advertise.
            InconsistentMessageError: this site missing from the senders, or a share
                missing, unexpected, or covering the wrong blocks.
            AuthenticationError: a share ciphertext does not decrypt.
            AllZeroSharedSecretError: a neighbour's mask key is a low-order point.
        """
        delivery = self._decode(untrusted_share_delivery, ShareDelivery)
        encoded, state = self._prepare_masked_input(delivery)
        self._masked = state
        self._last_blocks = tuple(state.mask_groups)
        self._record_sent(_Stage.MASKED, untrusted_share_delivery, encoded, keep=False)
        self._stage = _Stage.MASKED
        logger.info(
            "site %s sent masked input for %d block(s) in round %d",
            self._site_id,
            len(state.mask_groups),
            self._round_id,
        )
        return encoded

    def _prepare_masked_input(self, delivery: ShareDelivery) -> tuple[bytes, _MaskedState]:
        """The masked input for ``delivery`` and the state it leads to; changes nothing.

        Deterministic given the round's secrets, the advertisements, ``delivery`` and the
        contribution (X25519, HKDF, AES-CTR and Ed25519 signatures are), which is what
        lets :meth:`resend` rebuild the message instead of keeping it.
        """
        contribution = self._require_contribution()
        shared = self._shared_state()
        state = _MaskedState(share_senders=frozenset(delivery.share_senders))
        self._check_share_senders(shared, state.share_senders)
        self._receive_shares(shared, delivery, state)
        blocks, statements = [], []
        plan = shared.plan
        for block in plan.blocks_of(self._site_id):
            group = tuple(s for s in plan.groups[block] if s in state.share_senders)
            if block_shortfall(group, plan=plan, block=block, params=self._params, stage="shared keys") is not None:
                continue
            peers = tuple(s for s in plan.block_neighbours(block, self._site_id) if s in state.share_senders)
            blocks.append(MaskedBlock(block, self._mask_block(shared, contribution, block, peers)))
            state.mask_groups[block] = group
            if block in plan.graphs:
                payload = self._mask_statement_payload(block, self._site_id, peers)
                statements.append(MaskStatement(self._site_id, block, peers, crypto.sign(self._identity_key, payload)))
        message = MaskedInput(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            blocks=tuple(blocks),
            statements=tuple(statements),
        )
        return encode_site_message(message, self._identity_key), state

    def _check_share_senders(self, shared: _SharedState, senders: frozenset[str]) -> None:
        unknown = senders - shared.adverts.keys()
        if unknown:
            raise UnknownSenderError("share senders include sites that did not advertise")
        if self._site_id not in senders:
            raise InconsistentMessageError("share senders omit this site")

    def _receive_shares(self, shared: _SharedState, delivery: ShareDelivery, state: _MaskedState) -> None:
        plan = shared.plan
        expected = [peer for peer in neighbours(self._site_id, plan) if peer in state.share_senders]
        received = [share.peer for share in delivery.shares]
        if received != expected:
            raise InconsistentMessageError(
                "share delivery does not hold exactly one ciphertext per neighbour that shared keys"
            )
        share_secrets = _agree(self._share_private_key, [shared.adverts[peer].share_public_key for peer in received])
        for share, share_secret in zip(delivery.shares, share_secrets, strict=True):
            key = self._share_key(share_secret, sender=share.peer, recipient=self._site_id)
            associated = kdf.share_associated_data(
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                sender=share.peer,
                recipient=self._site_id,
            )
            plaintext = decode_share_plaintext(
                crypto.aead_decrypt(key, share.nonce, share.ciphertext, associated),
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                sender=share.peer,
                recipient=self._site_id,
            )
            if tuple(entry.block for entry in plaintext.blocks) != plan.common_blocks(self._site_id, share.peer):
                raise InconsistentMessageError(f"shares from {share.peer} cover the wrong blocks")
            for entry in plaintext.blocks:
                try:
                    values = (shamir.share_from_bytes(entry.mask_key_share), shamir.share_from_bytes(entry.seed_share))
                except ValueError:
                    raise MalformedMessageError(f"share from {share.peer} is not a field element") from None
                state.held[(share.peer, entry.block)] = values
        for block, values in shared.own_shares.items():
            state.held[(self._site_id, block)] = values

    def _mask_statement_payload(self, block: str, site: str, peers: Iterable[str]) -> bytes:
        return kdf.mask_statement_payload(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            block=block,
            site=site,
            peers=tuple(peers),
        )

    def _mask_block(
        self, shared: _SharedState, contribution: SiteContribution, block: str, neighbours_: tuple[str, ...]
    ) -> np.ndarray:
        adverts = shared.adverts
        peers = {
            peer: next(e.mask_public_key for e in adverts[peer].blocks if e.block == block) for peer in neighbours_
        }
        secret = self._secrets[block]
        return mask_block(
            contribution.blocks[block],
            weight=contribution.weight,
            params=self._params,
            federation_id=self._federation_id,
            round_id=self._round_id,
            block=block,
            site_id=self._site_id,
            seed=secret.seed,
            mask_private_key=secret.mask_private_key,
            peer_mask_public_keys=peers,
        )

    # ----------------------------------------------------------------- stage 4

    def consistency_check(self, untrusted_consistency_request: bytes) -> bytes:
        """Stage 4: sign, per block this site sent masked input for, the survivor set the
        coordinator claims, and return the signatures.

        A block is signed only if its set holds this site, lies within the block's group
        as this site formed it (less the sites it was told did not share keys), and still
        meets the block's threshold and every minimum; blocks the request omits or that
        fall short are not signed, and nothing is ever revealed for them. Answered once:
        a site signs one set per block and round.

        Raises:
            StageOrderError: not the message this stage expects, or no masked input sent.
            ReplayedMessageError: a consistency request was already answered.
            MalformedMessageError: (and subclasses) a malformed request.
            WrongFederationError, WrongRoundError, WrongRecipientError: wrong context.
            InconsistentMessageError: a block this site sent no masked input for, a set
                without this site, or a set naming sites outside the block's group.
            OutsideBlockGroupError: a set naming a site outside the block's public
                group ``P_b``.

        Notes:
            Bonawitz et al. 2017, section 4, ConsistencyCheck round (malicious server):
            because every honest site signs at most one set per block and ``2 t_b >
            max_group_size`` (or ``2 t_b > |P_b|`` for a block with a declared group,
            whose sets never hold an outsider), two different sets can never both carry
            ``t_b`` honest signatures, so all honest sites that later reveal shares of
            a block do so for the same set.
        """
        request = self._decode(untrusted_consistency_request, ConsistencyRequest)
        shared, masked = self._shared_state(), self._masked_state()
        signed: dict[str, tuple[str, ...]] = {}
        for entry in request.blocks:
            group = masked.mask_groups.get(entry.block)
            if group is None:
                raise InconsistentMessageError(
                    f"consistency request names {entry.block}, for which this site sent no masked input"
                )
            if self._site_id not in entry.survivors:
                raise InconsistentMessageError(f"survivor set of {entry.block} does not hold this site")
            if not all(self._params.is_group_member(entry.block, site) for site in entry.survivors):
                raise OutsideBlockGroupError(
                    f"survivor set of {entry.block} names a site outside the block's public group"
                )
            if not set(entry.survivors) <= set(group):
                raise InconsistentMessageError(
                    f"survivor set of {entry.block} names sites outside the group this site masked with"
                )
            if block_shortfall(
                entry.survivors, plan=shared.plan, block=entry.block, params=self._params, stage="survived"
            ):
                continue
            signed[entry.block] = entry.survivors
        self._check_mask_statements(request, signed, masked)
        signatures = tuple(
            BlockSignature(block, crypto.sign(self._identity_key, self._consistency_payload(block, survivors)))
            for block, survivors in sorted(signed.items())
        )
        message = ConsistencyResponse(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            signatures=signatures,
        )
        encoded = encode_site_message(message, self._identity_key)
        masked.signed = signed
        self._last_blocks = tuple(sorted(signed))
        self._record_sent(_Stage.CHECKED, untrusted_consistency_request, encoded)
        self._stage = _Stage.CHECKED
        logger.info(
            "site %s signed the survivor sets of %d block(s) in round %d", self._site_id, len(signed), self._round_id
        )
        return encoded

    def _check_mask_statements(
        self, request: ConsistencyRequest, signed: Mapping[str, tuple[str, ...]], masked: _MaskedState
    ) -> None:
        """On the sparse graph: before this site signs a block's survivor set ``S``, every
        survivor whose shares it holds must show its own signed statement of the peers it
        masked the block with, at least ``min_masked`` of them in ``S``. (This site's own
        count, and every count on its own graph, :func:`block_shortfall` has checked.)

        Raises:
            InconsistentMessageError: a statement missing, unasked for, or naming the
                wrong peers of this site.
            AuthenticationError: a statement whose signature does not verify.
            ConsistencyCheckError: a survivor with fewer than ``min_masked`` masked peers
                in ``S``.

        Notes:
            This site reveals the self-mask share of every such survivor ``u`` once ``S``
            passes. The masks of ``u`` that the coordinator cannot remove are those with
            peers in ``S`` (it rebuilds the mask keys of the others) that do not collude
            with it, so ``u``'s input is only ever unmasked in a sum with at least
            ``min_masked + 1 - c`` honest inputs, ``c`` the colluders (docs/protocol.md,
            "Sparse masking graph"). The statement is ``u``'s own, so no view the
            coordinator showed anyone changes it.
        """
        plan = self._shared_state().plan
        given = {(entry.block, entry.site): entry for entry in request.statements}
        wanted = set()
        for block, survivors in signed.items():
            graph = plan.graphs.get(block)
            if graph is None:
                continue
            present = set(survivors)
            for peer in survivors:
                if peer == self._site_id or (peer, block) not in masked.held:
                    continue
                wanted.add((block, peer))
                statement = given.get((block, peer))
                if statement is None:
                    raise InconsistentMessageError(
                        f"consistency request lacks the mask statement of {peer} for {block}"
                    )
                if self._site_id not in statement.peers:
                    raise InconsistentMessageError(
                        f"mask statement of {peer} for {block} omits this site, which shared keys with it"
                    )
                crypto.verify_signature_remembered(
                    self._roster[peer],
                    self._mask_statement_payload(block, peer, statement.peers),
                    statement.signature,
                )
                kept = sum(other in present for other in statement.peers)
                if kept < graph.min_masked:
                    raise ConsistencyCheckError(
                        f"{peer} masked {block} with {kept} site(s) of the survivor set, "
                        f"l = {graph.min_masked} required"
                    )
        unasked = {key for key in given if key[0] in signed and key not in wanted}
        if unasked:
            raise InconsistentMessageError("consistency request holds mask statements this site does not check")

    def _consistency_payload(self, block: str, survivors: Iterable[str]) -> bytes:
        return kdf.consistency_payload(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            block=block,
            survivors=tuple(survivors),
        )

    # ----------------------------------------------------------------- stage 5

    def unmask(self, untrusted_unmask_request: bytes) -> bytes:
        """Stage 5: reveal, for each peer of each block signed in the consistency check,
        the share of its self-mask seed (it survived) or of its mask key (it dropped),
        never both; answered once.

        Raises:
            StageOrderError: not the message this stage expects, or no consistency check.
            ReplayedMessageError: an unmask request was already answered.
            BothSharesRequestedError: a site is named both survivor and dropped, or (in a
                second request) a peer is asked for the other kind of share than the one
                already revealed.
            MalformedMessageError: (and subclasses) a malformed request.
            WrongFederationError, WrongRoundError, WrongRecipientError: wrong context.
            InconsistentMessageError: the survivors and dropped sites are not exactly the
                sites that shared keys, this site is not among the survivors, or
                signatures are given for a block this site did not sign.
            ConsistencyCheckError: fewer than ``t_b`` signatures of distinct members of a
                signed set, or a survivor/dropped split that contradicts the set signed.
            OutsideBlockGroupError: a consistency signer outside the block's public
                group ``P_b``.
            AuthenticationError: a forwarded consistency signature does not verify over
                the set this site signed.

        Notes:
            Revealing both shares of one peer would let the coordinator strip every mask
            from that peer's input. A survivor reveals only for the set it signed, with
            ``t_b`` signatures of group members over that same set: since ``2 t_b >
            max_group_size`` (``2 t_b > |P_b|`` where the block's group is declared, and
            then every signer must be in ``P_b``) and each honest site signs one set per
            block, every honest site that answers reveals seed shares for the same peers
            and mask-key shares for the same others, so the coordinator never collects
            ``t_b`` shares of both kinds for one peer (Bonawitz et al. 2017, section 4, ConsistencyCheck and
            Unmasking rounds; section 6, active adversary). A site answers once and keeps
            what it revealed for the whole round.
        """
        if self._stage is _Stage.DONE:
            self._refuse_second_request(untrusted_unmask_request)
        request = self._decode(untrusted_unmask_request, UnmaskRequest)
        shared, masked = self._shared_state(), self._masked_state()
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise BothSharesRequestedError("unmask request names a site both survivor and dropped")
        if survivors | dropped != masked.share_senders:
            raise InconsistentMessageError("survivors and dropped sites must be exactly the sites that shared keys")
        if self._site_id not in survivors:
            raise InconsistentMessageError("unmask request does not count this site as a survivor")
        proofs = {entry.block: entry.signatures for entry in request.consistency}
        unsigned = set(proofs) - set(masked.signed)
        if unsigned:
            raise InconsistentMessageError("unmask request carries signatures for a block this site did not sign")
        for block, signed_set in sorted(masked.signed.items()):
            group = masked.mask_groups[block]
            if tuple(s for s in group if s in survivors) != signed_set:
                raise ConsistencyCheckError(f"unmask request's survivors of {block} differ from the set signed")
        revealed = []
        for block, signed_set in sorted(masked.signed.items()):
            if block not in proofs:
                continue
            self._verify_consistency(block, signed_set, proofs[block], shared.plan.thresholds[block])
            for peer in masked.mask_groups[block]:
                if (peer, block) not in masked.held:
                    continue  # not a neighbour on the sparse graph: this site holds no share of it
                key_share, seed_share = masked.held[(peer, block)]
                kind, value = (
                    (ShareKind.SELF_MASK_SEED, seed_share) if peer in signed_set else (ShareKind.MASK_KEY, key_share)
                )
                revealed.append(RevealedShare(peer, block, kind, shamir.share_to_bytes(value)))
        revealed.sort(key=lambda s: (s.peer, s.block))
        message = UnmaskResponse(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            shares=tuple(revealed),
        )
        encoded = encode_site_message(message, self._identity_key)
        self._record_sent(_Stage.DONE, untrusted_unmask_request, encoded)
        self._stage = _Stage.DONE
        self._revealed = {(share.peer, share.block): share.kind for share in revealed}
        self._last_blocks = tuple(sorted({share.block for share in revealed}))
        self._forget_secrets()
        logger.info("site %s revealed %d share(s) in round %d", self._site_id, len(revealed), self._round_id)
        return encoded

    def _verify_consistency(
        self, block: str, signed_set: tuple[str, ...], signatures: tuple[SiteSignature, ...], threshold: int
    ) -> None:
        signers = [entry.site for entry in signatures]
        if len(set(signers)) != len(signers):
            raise ConsistencyCheckError(f"a site signed the survivor set of {block} twice")
        if not all(self._params.is_group_member(block, site) for site in signers):
            raise OutsideBlockGroupError(f"a signature over the survivor set of {block} from outside its public group")
        outsiders = set(signers) - set(signed_set)
        if outsiders:
            raise ConsistencyCheckError(f"signatures over the survivor set of {block} from sites outside it")
        if len(signers) < threshold:
            raise ConsistencyCheckError(
                f"{len(signers)} signature(s) over the survivor set of {block}, t = {threshold} required"
            )
        payload = self._consistency_payload(block, signed_set)
        for entry in signatures:
            crypto.verify_signature_remembered(self._roster[entry.site], payload, entry.signature)

    def _refuse_second_request(self, untrusted_unmask_request: bytes) -> None:
        """After answering: refuse any further unmask request, naming the contradiction if
        it asks for the other kind of share of a peer than the one revealed."""
        request = decode_coordinator_message(
            untrusted_unmask_request,
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            recipient=self._site_id,
            max_bytes=self._params.max_message_bytes,
        )
        if isinstance(request, UnmaskRequest):
            survivors, dropped = set(request.survivors), set(request.dropped)
            for (peer, _block), kind in sorted(self._revealed.items()):
                other = peer in dropped if kind is ShareKind.SELF_MASK_SEED else peer in survivors
                if other:
                    raise BothSharesRequestedError(
                        f"a second unmask request asks for the other share of {peer}, already revealed this round"
                    )
        raise ReplayedMessageError("unmask: that stage is already done")

    # ------------------------------------------------- saving and restoring the state

    def export_state(self) -> bytes:
        """Everything this machine needs to go on from where it stopped, as signed,
        canonical JSON (:mod:`blossom_secure.secagg.site_state`).

        Save it (:func:`blossom_secure.site.round_state.save_round_state`) after each stage
        method returns and *before* that method's message leaves the site; in the next
        process, :meth:`from_state` gives a machine that answers, refuses and exports
        exactly as this one would.

        Returns:
            The state: this round's X25519 private keys and self-mask seeds (until the
            unmask stage is done), the advertisements accepted, the shares held, the
            groups, the survivor sets signed, the kinds of share revealed, and a record of
            every message sent (the messages themselves, except the masked input, of
            which only the SHA-256 is kept). Signed with the identity key. It must stay on
            the site's machine, readable by the site only; the coordinator never holds it.

        Raises:
            ValueError: the state would be larger than ``site_state.MAX_STATE_BYTES``.

        Notes:
            Saving before sending is what makes a restart safe. A stage run again from
            the state saved before it (the process ended before saving) sends nothing
            that left before, because nothing had. Had the message left first, the rerun
            would make a second answer: Shamir shares from fresh polynomials, which with
            the first ones can rebuild a secret from fewer than ``t_b`` holders, or a
            second masked input whose difference with the first strips the masks
            (Bonawitz et al. 2017, section 4: a user sends each round's message once).
        """
        shared, masked = self._shared, self._masked
        live = _Stage.ADVERTISED <= self._stage < _Stage.DONE
        record = SiteRoundState(
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            site_id=self._site_id,
            roster_sha256=roster_sha256(self._roster),
            terms_sha256=terms_sha256(self._block_sizes, self._params),
            contribution_sha256=self._contribution_sha256(),
            stage=int(self._stage),
            sent=tuple(self._sent),
            share_private_key=self._share_private_key if live else None,
            block_secrets=tuple(
                BlockSecret(block, secret.mask_private_key, secret.seed)
                for block, secret in sorted(self._secrets.items())
            ),
            advertisements=None if shared is None else shared.signed_adverts,
            own_shares=()
            if shared is None
            else tuple(
                HeldShare(self._site_id, block, shamir.share_to_bytes(key), shamir.share_to_bytes(seed))
                for block, (key, seed) in sorted(shared.own_shares.items())
            ),
            share_senders=None if masked is None else tuple(sorted(masked.share_senders)),
            held=()
            if masked is None
            else tuple(
                HeldShare(peer, block, shamir.share_to_bytes(key), shamir.share_to_bytes(seed))
                for (peer, block), (key, seed) in sorted(masked.held.items())
            ),
            mask_groups=() if masked is None else tuple(sorted(masked.mask_groups.items())),
            signed=() if masked is None else tuple(sorted(masked.signed.items())),
            revealed=tuple((peer, block, kind) for (peer, block), kind in sorted(self._revealed.items())),
        )
        return encode_site_state(record, self._identity_key)

    @classmethod
    def from_state(
        cls,
        state: bytes,
        *,
        site_id: str,
        federation_id: str,
        federation_sha256: bytes,
        round_id: int,
        roster: Mapping[str, bytes],
        identity_key: Ed25519PrivateKey,
        block_sizes: Mapping[str, int],
        params: SecAggParams,
        contribution: SiteContribution | None,
        max_state_bytes: int = MAX_STATE_BYTES,
    ) -> SiteStageMachine:
        """Restore, in a fresh process, a machine saved with :meth:`export_state`.

        Every argument but ``state`` is as for the constructor and comes from the site's
        own files (its site file, identity key and federation file) and the round in
        progress, never from the state.

        Args:
            state: The bytes :meth:`export_state` returned, read back from the site's
                own state file.
            site_id: This site's id.
            federation_id: The federation's id.
            federation_sha256: The SHA-256 of the federation file.
            round_id: The round in progress.
            roster: Site id to raw Ed25519 public key.
            identity_key: This site's Ed25519 private key.
            block_sizes: The federation's layout.
            params: The round's protocol parameters.
            contribution: The contribution the machine was made with (the same updates,
                byte for byte, weight and policy minimum), or ``None`` once the masked
                input is sent (the machine no longer needs it, but then cannot send its
                masked input again: :meth:`resend` raises
                :class:`StageAlreadyAnsweredError`).
            max_state_bytes: Length limit of ``state``, checked before parsing.

        Returns:
            A new machine at the stage the state was saved at.

        Raises:
            TypeError: ``contribution`` is neither a ``SiteContribution`` nor ``None``.
            ValueError: inconsistent arguments (as for the constructor), or no
                contribution while the masked input is not sent yet.
            SiteStateError: (also a ``ValueError``) the state is oversized, malformed,
                of another version, not signed by this site's identity key, bound to
                another site, federation, federation file, round, roster, layout or set
                of parameters, made with another contribution, or inconsistent: secrets
                that do not match the signed advertisement, or advertisements, shares,
                groups, survivor sets or messages the machine would never have accepted
                or sent.

        Notes:
            The terms a site relies on for its privacy (roster, thresholds, public
            groups, layout) are the caller's; the state carries only their digests and is
            refused if they differ. Nor is anything else in it taken on trust: the
            advertisements are verified again against the roster, the plan, groups and
            masking groups are derived again from them, the secrets must match the
            signed advertisement, and every message recorded must carry this site's
            signature and agree with the shares, survivor sets and kinds revealed.

            The masked input is not stored (it is ``4 (d + 1)`` bytes per block, up to
            hundreds of MiB): the caller passes the contribution again, and the state is
            refused unless the contribution's SHA-256 is the one recorded when the state
            was first exported. So a restarted site can never mask a *different* update
            under the same masks (an update lost and trained again, training not being
            deterministic): two masked inputs under one set of masks would give the
            coordinator the difference of the two updates. To send the masked input
            again, :meth:`resend` rebuilds it from the state, the identical request and
            the contribution (every step is deterministic) and sends it only if its
            SHA-256 is the one recorded: the same bytes, or nothing. Storing the vector
            instead would double the disk written per round for no gain in safety (it is
            a function of what is stored), and the caller keeps the update until the
            masked input is sent in any case. The one kind of share revealed per peer
            is part of the state, so a restarted site still refuses a second unmask
            request for the other kind (Bonawitz et al. 2017, section 4, Unmasking).
        """
        if contribution is not None and not isinstance(contribution, SiteContribution):
            raise TypeError("contribution must be a SiteContribution or None")
        machine = cls.__new__(cls)
        machine._bind(
            site_id=site_id,
            federation_id=federation_id,
            federation_sha256=federation_sha256,
            round_id=round_id,
            roster=roster,
            identity_key=identity_key,
            block_sizes=block_sizes,
            params=params,
            contribution=contribution,
        )
        record = decode_site_state(
            state,
            site_id=site_id,
            identity_public_key=roster[site_id],
            federation_id=federation_id,
            federation_sha256=federation_sha256,
            round_id=round_id,
            roster_sha256=roster_sha256(roster),
            terms_sha256=terms_sha256(block_sizes, params),
            max_bytes=max_state_bytes,
        )
        if contribution is None and record.stage < _Stage.MASKED:
            raise ValueError(
                f"the state is at stage {STATE_STAGES[record.stage]}: the contribution is needed to go on"
            )
        if contribution is not None and _contribution_sha256(contribution) != record.contribution_sha256:
            raise SiteStateError(
                "the contribution differs from the one this state was made with: a restarted site never masks "
                "another update in the same round"
            )
        try:
            machine._restore(record)
        except SiteStateError:
            raise
        except (ProtocolError, ValueError) as exc:
            raise SiteStateError(f"the saved state is inconsistent: {exc}") from None
        logger.info("site %s restored its state of round %d at stage %s", site_id, round_id, machine.stage)
        return machine

    def resend(self, untrusted_request: bytes | None) -> bytes:
        """The message this site already sent in answer to ``untrusted_request``, byte
        for byte, for a runtime retrying after a restart (the stage methods refuse a
        request already answered, like any replay).

        Only the answer to the last stage done is sent again, and only for the very
        request it answered (the same bytes): never a new message.

        Args:
            untrusted_request: The coordinator's request, exactly as received; ``None``
                for the advertisement, which answers no request.

        Returns:
            The bytes sent before.

        Raises:
            StageOrderError: nothing was sent yet, or the request belongs to a stage not
                answered yet (answer it with its stage method).
            ReplayedMessageError: the request belongs to an earlier stage, or differs
                from the one the last stage answered.
            BothSharesRequestedError: after unmasking, another request that asks for the
                other kind of share of a peer than the one revealed.
            StageAlreadyAnsweredError: the masked input cannot be rebuilt byte for byte
                (no contribution was given to :meth:`from_state`, or the update changed).
            MessageTooLargeError, MalformedMessageError, UnsupportedVersionError: the
                request's header.
            WrongFederationError, WrongRoundError, WrongRecipientError: (after
                unmasking) another request for another context.

        Notes:
            The masked input is not kept (see :meth:`from_state`): it is rebuilt from
            the state, the same share delivery and the same contribution, and sent only
            if its SHA-256 is the one recorded when it was first sent. Every other
            answer is kept whole. Sending the same bytes twice reveals nothing new; a
            second, different answer to one stage could (Bonawitz et al. 2017, section
            4: one masked input and one unmask answer per user and round).
        """
        if self._stage is _Stage.NEW:
            raise StageOrderError("nothing has been sent this round")
        last = self._sent[-1]
        if untrusted_request is None:
            if self._stage is _Stage.ADVERTISED and last.message is not None:
                return last.message
            raise ReplayedMessageError("advertise_keys: a stage already done; only the last answer is sent again")
        got = peek_message_type(untrusted_request, max_bytes=self._params.max_message_bytes)
        if got not in _EXPECTED:
            raise MalformedMessageError(f"{got.name} is not a coordinator message")
        answered = _EXPECTED[got] + 1
        if answered > self._stage:
            raise StageOrderError(f"{got.name} belongs to a stage not answered yet")
        if answered < self._stage:
            raise ReplayedMessageError(
                f"{got.name} belongs to a stage already done; only the last answer is sent again"
            )
        if hashlib.sha256(untrusted_request).digest() != last.request_sha256:
            if self._stage is _Stage.DONE:
                self._refuse_second_request(untrusted_request)
            raise ReplayedMessageError(f"{got.name}: another request for a stage already answered")
        if last.message is not None:
            return last.message
        return self._rebuild_masked_input(untrusted_request, last.message_sha256)

    def _rebuild_masked_input(self, untrusted_share_delivery: bytes, message_sha256: bytes) -> bytes:
        if self._contribution is None:
            raise StageAlreadyAnsweredError(
                "masked_input: already answered; the masked input is not kept, and no contribution was given to "
                "rebuild it"
            )
        delivery = decode_coordinator_message(
            untrusted_share_delivery,
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            recipient=self._site_id,
            max_bytes=self._params.max_message_bytes,
        )
        if not isinstance(delivery, ShareDelivery):
            raise MalformedMessageError("expected ShareDelivery")
        encoded, _ = self._prepare_masked_input(delivery)
        if hashlib.sha256(encoded).digest() != message_sha256:
            raise StageAlreadyAnsweredError(
                "masked_input: already answered, and the masked input rebuilt differs from the one sent (has the "
                "update changed?); nothing is sent"
            )
        return encoded

    def _record_sent(
        self, stage: _Stage, untrusted_request: bytes | None, encoded: bytes, *, keep: bool = True
    ) -> None:
        self._sent.append(
            SentMessage(
                stage=STAGE_NAMES[stage - 1],
                request_sha256=None if untrusted_request is None else hashlib.sha256(untrusted_request).digest(),
                message_sha256=hashlib.sha256(encoded).digest(),
                message=encoded if keep else None,
            )
        )

    def _contribution_sha256(self) -> bytes:
        if self._contribution_digest is None:
            self._contribution_digest = _contribution_sha256(self._require_contribution())
        return self._contribution_digest

    def _require_contribution(self) -> SiteContribution:
        if self._contribution is None:
            raise StageOrderError("this machine was restored without its contribution")
        return self._contribution

    # ---------------------------------------------------------- checks of a restored state

    def _restore(self, record: SiteRoundState) -> None:
        """Rebuild the machine at ``record.stage``, checking every part against the
        others and against what this site signed (nothing in the record is trusted
        because it is there)."""
        stage = _Stage(record.stage)
        if stage >= _Stage.ADVERTISED:
            advert = self._stored_message(record.sent[0], AdvertiseKeys)
            self._advertisement = record.sent[0].message or b""
            if self._contribution is not None and (
                tuple(entry.block for entry in advert.blocks) != tuple(sorted(self._contribution.blocks))
                or advert.min_contributors != self._contribution.min_contributors
            ):
                raise SiteStateError("the advertisement saved does not match the contribution")
            if stage < _Stage.DONE:
                self._restore_secrets(record, advert)
        if _Stage.SHARED <= stage < _Stage.DONE:
            self._shared = self._restore_shared(record)
            sent_shares = self._stored_message(record.sent[1], EncryptedShares)
            if tuple(share.peer for share in sent_shares.shares) != neighbours(self._site_id, self._shared.plan):
                raise SiteStateError("the shares sent do not match the groups formed")
        if _Stage.MASKED <= stage < _Stage.DONE and self._shared is not None:
            self._masked = self._restore_masked(record, self._shared)
        if stage is _Stage.CHECKED and self._masked is not None:
            response = self._stored_message(record.sent[3], ConsistencyResponse)
            signed = self._masked.signed
            if tuple(entry.block for entry in response.signatures) != tuple(sorted(signed)):
                raise SiteStateError("the consistency answer sent does not match the survivor sets signed")
            own_key = self._roster[self._site_id]
            for entry in response.signatures:
                payload = self._consistency_payload(entry.block, signed[entry.block])
                try:
                    crypto.verify_signature(own_key, payload, entry.signature)
                except AuthenticationError:
                    raise SiteStateError(
                        f"the consistency answer sent does not match the survivor set signed for {entry.block}"
                    ) from None
        if stage is _Stage.DONE:
            response = self._stored_message(record.sent[4], UnmaskResponse)
            revealed = {(peer, block): kind for peer, block, kind in record.revealed}
            if {(share.peer, share.block): share.kind for share in response.shares} != revealed:
                raise SiteStateError("the kinds of share revealed do not match the unmask answer sent")
            self._revealed = revealed
        self._sent = list(record.sent)
        self._contribution_digest = record.contribution_sha256
        self._stage = stage
        self._last_blocks = self._blocks_of_last_message()

    def _blocks_of_last_message(self) -> tuple[str, ...]:
        if self._stage is _Stage.ADVERTISED:
            return tuple(self._secrets)
        if self._stage is _Stage.SHARED and self._shared is not None:
            return self._shared.plan.blocks_of(self._site_id)
        if self._stage is _Stage.MASKED and self._masked is not None:
            return tuple(self._masked.mask_groups)
        if self._stage is _Stage.CHECKED and self._masked is not None:
            return tuple(sorted(self._masked.signed))
        if self._stage is _Stage.DONE:
            return tuple(sorted({block for _, block in self._revealed}))
        return ()

    def _stored_message(self, record: SentMessage, expected: type[_SiteMessageT]) -> _SiteMessageT:
        if record.message is None:
            raise SiteStateError(f"the {record.stage} message is not in the state")
        message = decode_site_message(
            record.message,
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            roster={self._site_id: self._roster[self._site_id]},
            max_bytes=self._params.max_message_bytes,
        )
        if not isinstance(message, expected):
            raise SiteStateError(f"the {record.stage} message saved is not {expected.__name__}")
        return message

    def _restore_secrets(self, record: SiteRoundState, advert: AdvertiseKeys) -> None:
        if record.share_private_key is None:
            raise SiteStateError("the state lacks the share private key")
        if crypto.x25519_public_key(record.share_private_key) != advert.share_public_key:
            raise SiteStateError("the share private key saved does not match the advertisement")
        advertised = {entry.block: entry for entry in advert.blocks}
        if tuple(secret.block for secret in record.block_secrets) != tuple(advertised):
            raise SiteStateError("the blocks of the secrets saved differ from those advertised")
        secrets_by_block = {}
        for secret in record.block_secrets:
            entry = advertised[secret.block]
            commitment = kdf.seed_commitment(
                secret.seed,
                federation_id=self._federation_id,
                round_id=self._round_id,
                block=secret.block,
                site=self._site_id,
            )
            if crypto.x25519_public_key(secret.mask_private_key) != entry.mask_public_key:
                raise SiteStateError(f"the mask private key of {secret.block} does not match the advertisement")
            if commitment != entry.seed_commitment:
                raise SiteStateError(f"the seed of {secret.block} does not match its commitment in the advertisement")
            secrets_by_block[secret.block] = _BlockSecrets(
                secret.mask_private_key, entry.mask_public_key, secret.seed, commitment
            )
        self._share_private_key = record.share_private_key
        self._secrets = secrets_by_block

    def _restore_shared(self, record: SiteRoundState) -> _SharedState:
        signed_adverts = record.advertisements or ()
        adverts = self._verify_advertisements(signed_adverts)
        plan = plan_blocks(
            {s: [b.block for b in a.blocks] for s, a in adverts.items()},
            {s: a.min_contributors for s, a in adverts.items()},
            self._params,
            graph_keys=self._graph_keys,
        )
        if tuple(share.block for share in record.own_shares) != plan.blocks_of(self._site_id):
            raise SiteStateError("the site's own shares saved do not cover exactly the blocks it shares")
        own_shares = {
            share.block: (shamir.share_from_bytes(share.mask_key_share), shamir.share_from_bytes(share.seed_share))
            for share in record.own_shares
        }
        return _SharedState(plan, adverts, own_shares, tuple(signed_adverts))

    def _restore_masked(self, record: SiteRoundState, shared: _SharedState) -> _MaskedState:
        senders = frozenset(record.share_senders or ())
        self._check_share_senders(shared, senders)
        plan = shared.plan
        expected = {
            (peer, block)
            for peer in neighbours(self._site_id, plan)
            if peer in senders
            for block in plan.common_blocks(self._site_id, peer)
        } | {(self._site_id, block) for block in shared.own_shares}
        held = {
            (share.peer, share.block): (
                shamir.share_from_bytes(share.mask_key_share),
                shamir.share_from_bytes(share.seed_share),
            )
            for share in record.held
        }
        if set(held) != expected:
            raise SiteStateError("the shares held do not match the groups and the sites that shared keys")
        if any(held[(self._site_id, block)] != values for block, values in shared.own_shares.items()):
            raise SiteStateError("the site's own shares held differ from those it made")
        state = _MaskedState(share_senders=senders, held=held)
        for block in plan.blocks_of(self._site_id):
            group = tuple(s for s in plan.groups[block] if s in senders)
            if block_shortfall(group, plan=plan, block=block, params=self._params, stage="shared keys") is None:
                state.mask_groups[block] = group
        if tuple(state.mask_groups.items()) != record.mask_groups:
            raise SiteStateError("the groups masked with differ from those the advertisements and senders give")
        for block, survivors in record.signed:
            group = state.mask_groups.get(block)
            if (
                group is None
                or self._site_id not in survivors
                or not set(survivors) <= set(group)
                or block_shortfall(survivors, plan=plan, block=block, params=self._params, stage="survived")
            ):
                raise SiteStateError(f"the survivor set signed for {block} is not one this site would have signed")
            state.signed[block] = survivors
        return state

    # ----------------------------------------------------------------- helpers

    def _forget_secrets(self) -> None:
        """Drop every reference to this round's secrets (Python cannot wipe memory)."""
        self._secrets = {}
        self._share_private_key = b""
        self._shared = None
        self._masked = None

    def _require_stage(self, stage: _Stage, what: str) -> None:
        if self._stage is stage:
            return
        if self._stage > stage:
            raise ReplayedMessageError(f"{what}: that stage is already done")
        raise StageOrderError(f"{what}: an earlier stage is not done")

    def _shared_state(self) -> _SharedState:
        if self._shared is None:
            raise StageOrderError("keys have not been shared")
        return self._shared

    def _masked_state(self) -> _MaskedState:
        if self._masked is None:
            raise StageOrderError("no masked input has been sent")
        return self._masked

    def _decode(self, untrusted_message: bytes, expected: type[_CoordinatorMessageT]) -> _CoordinatorMessageT:
        got = peek_message_type(untrusted_message, max_bytes=self._params.max_message_bytes)
        if got not in _EXPECTED:
            raise MalformedMessageError(f"{got.name} is not a coordinator message")
        if got != expected.TYPE:
            if _EXPECTED[got] < self._stage:
                raise ReplayedMessageError(f"{got.name} belongs to a stage already done")
            raise StageOrderError(f"expected {expected.TYPE.name}, got {got.name}")
        self._require_stage(_EXPECTED[got], got.name)
        message = decode_coordinator_message(
            untrusted_message,
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            recipient=self._site_id,
            max_bytes=self._params.max_message_bytes,
        )
        if not isinstance(message, expected):
            raise MalformedMessageError(f"expected {expected.__name__}")
        return message


def _contribution_sha256(contribution: SiteContribution) -> bytes:
    """SHA-256 of a contribution: each block's name and float32 values (little-endian),
    in block order, then the weight and the policy minimum."""

    def lp(text: str) -> bytes:
        data = text.encode("utf-8")
        return struct.pack(">H", len(data)) + data

    digest = hashlib.sha256(kdf.PROTOCOL_LABEL + lp("site-contribution") + struct.pack(">I", len(contribution.blocks)))
    for block in sorted(contribution.blocks):
        values = np.ascontiguousarray(contribution.blocks[block], dtype="<f4")
        digest.update(lp(block) + struct.pack(">Q", values.size))
        digest.update(values.view(np.uint8))
    digest.update(lp(str(contribution.weight)) + struct.pack(">H", contribution.min_contributors))
    return digest.digest()


def _check_distinct_keys(adverts: Iterable[AdvertiseKeys]) -> None:
    seen: set[bytes] = set()
    for advert in adverts:
        for key in (advert.share_public_key, *(entry.mask_public_key for entry in advert.blocks)):
            if key in seen:
                raise DuplicatePublicKeyError("two advertised public keys are equal")
            seen.add(key)
