"""The coordinator's side of secure aggregation: an explicit stage machine.

The coordinator routes messages between sites, which never talk to each other directly,
and in the end removes the masks from each block's sum. It is not trusted with any single
site's update: it sees masked vectors, signed public keys, ciphertexts it cannot open, and
at most one kind of share per peer. Nor do the sites trust it to tell them all the same
thing: thresholds are public, and before unmasking every survivor signs the survivor set
it was told (the consistency check of Bonawitz et al. 2017, section 4), so a coordinator
that lies gets refusals, not secrets. This machine is the honest coordinator.

Use: call :meth:`CoordinatorStageMachine.receive` with each site message of the current
stage as it arrives, then :meth:`CoordinatorStageMachine.close_stage` (at the runtime's
deadline) to get the messages of the next stage, by recipient. After the unmask stage
closes, :meth:`CoordinatorStageMachine.results` holds each block's outcome. A ``receive``
that raises changes nothing; the runtime may log the error and carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from blossom_secure import crypto
from blossom_secure.blocks import is_head
from blossom_secure.secagg import kdf, shamir
from blossom_secure.secagg.errors import (
    AllZeroSharedSecretError,
    DuplicatePublicKeyError,
    InconsistentMessageError,
    MalformedMessageError,
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
from blossom_secure.secagg.messages import (
    AdvertiseKeys,
    BlockSignatures,
    BlockSurvivors,
    ConsistencyRequest,
    ConsistencyResponse,
    EncryptedShare,
    EncryptedShares,
    KeyBundle,
    MaskedInput,
    MaskStatement,
    MessageType,
    ShareDelivery,
    ShareKind,
    SiteSignature,
    UnmaskRequest,
    UnmaskResponse,
    decode_site_message,
    encode_coordinator_message,
    is_valid_identifier,
    peek_message_type,
)
from blossom_secure.secagg.params import SecAggParams
from blossom_secure.secagg.quantize import dequantize_sum
from blossom_secure.secagg.unmasking import DroppedSite, MaskContext, remove_masks

__all__ = ["BlockResult", "CoordinatorStageMachine"]

logger = logging.getLogger(__name__)

_SEED_LIMIT = 1 << 256
_MESSAGE_OVERHEAD_BYTES = 4096
_PER_BLOCK_OVERHEAD_BYTES = 128


@dataclass(frozen=True, eq=False)
class BlockResult:
    """The outcome of one block in one round.

    Attributes:
        block: The block name.
        contributors: Sites whose input is in the sum (empty when the block failed).
        weighted_sum: float64, the sum over contributors of ``weight * dequantised
            clipped update``; ``None`` if the block failed.
        weight_sum: The sum of the contributors' weights; ``None`` if the block failed.
        failure: Why the block was not aggregated, or ``None``.
    """

    block: str
    contributors: tuple[str, ...]
    weighted_sum: np.ndarray | None
    weight_sum: int | None
    failure: str | None


class _Stage(IntEnum):
    ADVERTISE = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    CONSISTENCY = 3
    UNMASK = 4
    DONE = 5


_STAGE_OF_TYPE = {
    MessageType.ADVERTISE_KEYS: _Stage.ADVERTISE,
    MessageType.ENCRYPTED_SHARES: _Stage.SHARE_KEYS,
    MessageType.MASKED_INPUT: _Stage.MASKED_INPUT,
    MessageType.CONSISTENCY_RESPONSE: _Stage.CONSISTENCY,
    MessageType.UNMASK_RESPONSE: _Stage.UNMASK,
}
_STAGE_NAMES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask", "done")


class _BlockFailure(Exception):
    """Internal: a block cannot be unmasked (never escapes this module)."""


class CoordinatorStageMachine:
    """The coordinator of one secure-aggregation round.

    Args:
        federation_id: The federation's id.
        federation_sha256: The SHA-256 (32 bytes) of the federation file.
        round_id: The round.
        roster: Site id to raw Ed25519 public key; at most ``params.max_group_size`` sites.
        block_sizes: The federation's layout: block name to number of float32 values.
        params: The round's protocol parameters.
        unmask_executor: Optional process pool that regenerates masks in parallel with
            this process (``None``: all in this process). Owned by the caller, reused
            across rounds; a thread pool would not help (``cryptography`` holds the GIL
            while it writes a keystream).
        unmask_parts: Parts each block's masks are split into when ``unmask_executor``
            is given, one done here and the others by the executor (typically the
            number of cores).

    Raises:
        ValueError: a bad roster (or one larger than ``params.max_group_size``), layout,
            id or federation hash, a layout whose masked input would not fit in
            ``params.max_message_bytes``, or ``unmask_parts`` < 1.

    Notes:
        The coordinator only relays ciphertexts it cannot open (the share keys come from
        X25519 agreements between sites) and receives, per peer and block, either seed
        shares or mask-key shares, never both (Bonawitz et al. 2017, section 4). Every
        secret it rebuilds is checked against the signed advertisement (seed commitment,
        mask public key), so a bad share yields a failed block, never a wrong sum.
        It refuses an advertisement of a block by a site outside the block's public group
        (``params.block_group``), as every honest site would refuse a bundle holding
        one, so it never forms a group with an outsider.
    """

    def __init__(
        self,
        *,
        federation_id: str,
        federation_sha256: bytes,
        round_id: int,
        roster: Mapping[str, bytes],
        block_sizes: Mapping[str, int],
        params: SecAggParams,
        unmask_executor: Executor | None = None,
        unmask_parts: int = 2,
    ) -> None:
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
                "federation's max_sites)"
            )
        largest = _MESSAGE_OVERHEAD_BYTES + sum(
            (size + 1) * params.ring_bytes + _PER_BLOCK_OVERHEAD_BYTES
            for block, size in block_sizes.items()
            if not is_head(block)
        )
        if largest > params.max_message_bytes:
            raise ValueError(f"a masked input of this layout needs up to {largest} bytes, over max_message_bytes")
        if not isinstance(unmask_parts, int) or isinstance(unmask_parts, bool) or unmask_parts < 1:
            raise ValueError("unmask_parts must be an int >= 1")
        self._executor = unmask_executor
        self._parts = unmask_parts
        self._federation_id = federation_id
        self._federation_sha256 = federation_sha256
        self._round_id = round_id
        self._roster = dict(roster)
        self._block_sizes = dict(block_sizes)
        self._params = params
        self._x = share_x_coordinates(self._roster)
        self._stage = _Stage.ADVERTISE
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._advert_bytes: dict[str, bytes] = {}
        self._public_keys: set[bytes] = set()
        self._plan: BlockPlan | None = None
        self._shares: dict[str, EncryptedShares] = {}
        self._mask_groups: dict[str, tuple[str, ...]] = {}
        self._failures: dict[str, str] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._masked_senders: set[str] = set()
        self._statements: dict[tuple[str, str], MaskStatement] = {}  # (block, site) -> its mask statement
        self._survivor_sets: dict[str, tuple[str, ...]] = {}  # block -> survivors sent for signing
        self._signatures: dict[str, dict[str, bytes]] = {}  # block -> signer -> signature
        self._signers: set[str] = set()
        self._responses: dict[str, dict[tuple[str, str], int]] = {}
        self._responders: set[str] = set()
        self._results: dict[str, BlockResult] = {}

    # ------------------------------------------------------------------ state

    @property
    def stage(self) -> str:
        """The stage now collecting messages (``"done"`` at the end)."""
        return _STAGE_NAMES[self._stage]

    @property
    def advertised(self) -> tuple[str, ...]:
        """Sites whose advertisement was accepted."""
        return tuple(sorted(self._adverts))

    @property
    def share_senders(self) -> tuple[str, ...]:
        """Sites whose encrypted shares were accepted."""
        return tuple(sorted(self._shares))

    @property
    def masked_input_senders(self) -> tuple[str, ...]:
        """Sites whose masked input was accepted."""
        return tuple(sorted(self._masked_senders))

    @property
    def consistency_signers(self) -> tuple[str, ...]:
        """Sites whose consistency-check signatures were accepted."""
        return tuple(sorted(self._signers))

    @property
    def unmask_responders(self) -> tuple[str, ...]:
        """Sites whose unmask response was accepted."""
        return tuple(sorted(self._responders))

    def results(self) -> dict[str, BlockResult]:
        """Every layout block's outcome, by block name.

        Raises:
            RuntimeError: the unmask stage has not been closed yet.
        """
        if self._stage is not _Stage.DONE:
            raise RuntimeError("results exist once the unmask stage is closed")
        return dict(self._results)

    # ---------------------------------------------------------------- receive

    def receive(self, untrusted_message: bytes) -> str:
        """Check and record one site message of the current stage.

        Args:
            untrusted_message: The bytes as received.

        Returns:
            The authenticated sender's site id.

        Raises:
            MessageTooLargeError, MalformedMessageError, UnsupportedVersionError,
            UnknownFieldError: not a canonical site message within the size limit.
            UnknownSenderError: the sender is outside the roster or not a participant
                of this stage.
            AuthenticationError: missing or invalid signature (of the message, or of a
                survivor set in the consistency check).
            WrongFederationError: another federation, or another version of its file.
            WrongRoundError: another round.
            StageOrderError: a message of another stage.
            ReplayedMessageError: the sender already sent this stage's message.
            DuplicatePublicKeyError: an advertised key equals one already advertised.
            AllZeroSharedSecretError: an advertised key is a low-order point.
            OutsideBlockGroupError: an advertisement of a block whose public group
                ``params.block_group(block)`` does not hold the sender (no group is ever
                formed with an outsider).
            InconsistentMessageError: content that contradicts the round (unknown
                blocks, wrong recipients or blocks, wrong vector sizes, signatures for
                the wrong blocks, wrong shares).
        """
        message_type = peek_message_type(untrusted_message, max_bytes=self._params.max_message_bytes)
        if message_type not in _STAGE_OF_TYPE:
            raise MalformedMessageError(f"{message_type.name} is not a site message")
        message = decode_site_message(
            untrusted_message,
            federation_id=self._federation_id,
            federation_sha256=self._federation_sha256,
            round_id=self._round_id,
            roster=self._roster,
            max_bytes=self._params.max_message_bytes,
        )
        stage = _STAGE_OF_TYPE[message_type]
        self._check_stage(stage, message.site_id)
        if isinstance(message, AdvertiseKeys):
            self._accept_advertisement(message, bytes(untrusted_message))
        elif isinstance(message, EncryptedShares):
            self._accept_shares(message)
        elif isinstance(message, MaskedInput):
            self._accept_masked_input(message)
        elif isinstance(message, ConsistencyResponse):
            self._accept_consistency_response(message)
        else:
            self._accept_unmask_response(message)
        return message.site_id

    def _check_stage(self, stage: _Stage, sender: str) -> None:
        if sender in self._senders(stage):
            raise ReplayedMessageError(f"{sender} already sent its {_STAGE_NAMES[stage]} message")
        if stage is not self._stage:
            when = "closed" if stage < self._stage else "not open"
            raise StageOrderError(f"{_STAGE_NAMES[stage]} message from {sender}: that stage is {when}")

    def _senders(self, stage: _Stage) -> Mapping[str, object] | set[str]:
        return (self._adverts, self._shares, self._masked_senders, self._signers, self._responders, set())[stage]

    def _accept_advertisement(self, message: AdvertiseKeys, raw: bytes) -> None:
        keys = [message.share_public_key, *(entry.mask_public_key for entry in message.blocks)]
        for entry in message.blocks:
            if entry.block not in self._block_sizes:
                raise InconsistentMessageError(f"{message.site_id} advertised block {entry.block} outside the layout")
        verify_offer(message.site_id, (entry.block for entry in message.blocks), self._params)
        if len(set(keys)) != len(keys) or any(key in self._public_keys for key in keys):
            raise DuplicatePublicKeyError(f"{message.site_id} advertised a public key already in use")
        if any(crypto.is_low_order_x25519_public_key(key) for key in keys):
            raise AllZeroSharedSecretError(f"{message.site_id} advertised a low-order X25519 key")
        self._adverts[message.site_id] = message
        self._advert_bytes[message.site_id] = raw
        self._public_keys.update(keys)

    def _accept_shares(self, message: EncryptedShares) -> None:
        plan = self._require_plan()
        if message.site_id not in self._adverts:
            raise UnknownSenderError(f"{message.site_id} did not advertise keys this round")
        if tuple(share.peer for share in message.shares) != neighbours(message.site_id, plan):
            raise InconsistentMessageError(f"{message.site_id} must send one ciphertext to each neighbour, no more")
        self._shares[message.site_id] = message

    def _expected_blocks(self, site: str) -> tuple[str, ...]:
        return tuple(block for block, group in sorted(self._mask_groups.items()) if site in group)

    def _accept_masked_input(self, message: MaskedInput) -> None:
        sender = message.site_id
        if sender not in self._shares:
            raise UnknownSenderError(f"{sender} did not share keys this round")
        if tuple(entry.block for entry in message.blocks) != self._expected_blocks(sender):
            raise InconsistentMessageError(f"{sender} sent masked input for the wrong blocks")
        for entry in message.blocks:
            if (
                entry.vector.dtype != self._params.ring_dtype
                or entry.vector.shape[0] != self._block_sizes[entry.block] + 1
            ):
                raise InconsistentMessageError(f"{sender} sent a vector of the wrong ring or size for {entry.block}")
        plan = self._require_plan()
        sparse = tuple(entry.block for entry in message.blocks if entry.block in plan.graphs)
        if tuple(statement.block for statement in message.statements) != sparse:
            raise InconsistentMessageError(f"{sender} must state its masked peers for each block on the sparse graph")
        for statement in message.statements:
            peers = tuple(s for s in plan.block_neighbours(statement.block, sender) if s in self._shares)
            if statement.peers != peers:
                raise InconsistentMessageError(f"{sender} states other peers for {statement.block} than its neighbours")
            payload = kdf.mask_statement_payload(
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                block=statement.block,
                site=sender,
                peers=statement.peers,
            )
            crypto.verify_signature(self._roster[sender], payload, statement.signature)
        for statement in message.statements:
            self._statements[(statement.block, sender)] = statement
        for entry in message.blocks:
            accumulator = self._sums[entry.block]
            np.add(accumulator, entry.vector, out=accumulator)
        self._masked_senders.add(sender)

    def _blocks_to_sign(self, site: str) -> tuple[str, ...]:
        return tuple(block for block, survivors in sorted(self._survivor_sets.items()) if site in survivors)

    def _accept_consistency_response(self, message: ConsistencyResponse) -> None:
        sender = message.site_id
        if sender not in self._masked_senders:
            raise UnknownSenderError(f"{sender} sent no masked input this round")
        if tuple(entry.block for entry in message.signatures) != self._blocks_to_sign(sender):
            raise InconsistentMessageError(f"{sender} signed the survivor sets of other blocks than it was sent")
        for entry in message.signatures:
            payload = kdf.consistency_payload(
                federation_id=self._federation_id,
                federation_sha256=self._federation_sha256,
                round_id=self._round_id,
                block=entry.block,
                survivors=self._survivor_sets[entry.block],
            )
            crypto.verify_signature(self._roster[sender], payload, entry.signature)
        for entry in message.signatures:
            self._signatures.setdefault(entry.block, {})[sender] = entry.signature
        self._signers.add(sender)

    def _expected_reveals(self, site: str) -> list[tuple[str, str, ShareKind]]:
        plan = self._require_plan()
        expected = []
        for block, group in sorted(self._mask_groups.items()):
            if block in self._failures or site not in self._signatures.get(block, {}):
                continue
            for peer in group:
                if not plan.holds_shares_of(block, site, peer):
                    continue
                kind = ShareKind.SELF_MASK_SEED if peer in self._masked_senders else ShareKind.MASK_KEY
                expected.append((peer, block, kind))
        return sorted(expected, key=lambda item: (item[0], item[1]))

    def _accept_unmask_response(self, message: UnmaskResponse) -> None:
        sender = message.site_id
        if sender not in self._signers:
            raise UnknownSenderError(f"{sender} signed no survivor set this round")
        got = [(share.peer, share.block, share.kind) for share in message.shares]
        if got != self._expected_reveals(sender):
            raise InconsistentMessageError(f"{sender} revealed other shares than the protocol asks for")
        values: dict[tuple[str, str], int] = {}
        for share in message.shares:
            try:
                values[(share.peer, share.block)] = shamir.share_from_bytes(share.value)
            except ValueError:
                raise MalformedMessageError(f"{sender} revealed a share that is not a field element") from None
        self._responses[sender] = values
        self._responders.add(sender)

    # ------------------------------------------------------------ close stage

    def close_stage(self) -> dict[str, bytes]:
        """Close the current stage and return the next stage's messages by recipient.

        Returns:
            Site id to encoded message; empty after the unmask stage, whose closing
            computes :meth:`results`.

        Raises:
            RuntimeError: the round is already done.
        """
        if self._stage is _Stage.ADVERTISE:
            messages = self._close_advertise()
        elif self._stage is _Stage.SHARE_KEYS:
            messages = self._close_share_keys()
        elif self._stage is _Stage.MASKED_INPUT:
            messages = self._close_masked_input()
        elif self._stage is _Stage.CONSISTENCY:
            messages = self._close_consistency()
        elif self._stage is _Stage.UNMASK:
            messages = self._close_unmask()
        else:
            raise RuntimeError("the round is done")
        self._stage = _Stage(self._stage + 1)
        return messages

    def _require_plan(self) -> BlockPlan:
        if self._plan is None:
            raise StageOrderError("the advertise stage is not closed")
        return self._plan

    def _statements_for(self, site: str) -> tuple[MaskStatement, ...]:
        """The mask statements ``site`` checks before signing: for each sparse block it is
        asked to sign, those of the survivors whose shares it holds."""
        plan = self._require_plan()
        found = []
        for block in self._blocks_to_sign(site):
            if block not in plan.graphs:
                continue
            found.extend(
                self._statements[(block, peer)]
                for peer in self._survivor_sets[block]
                if peer != site and plan.holds_shares_of(block, site, peer)
            )
        return tuple(found)

    def _close_advertise(self) -> dict[str, bytes]:
        offers = {site: [entry.block for entry in advert.blocks] for site, advert in self._adverts.items()}
        minimums = {site: advert.min_contributors for site, advert in self._adverts.items()}
        graph_keys = round_graph_keys(
            federation_id=self._federation_id, federation_sha256=self._federation_sha256, round_id=self._round_id
        )
        self._plan = plan_blocks(offers, minimums, self._params, graph_keys=graph_keys)
        self._failures.update(self._plan.failures)
        bundle = tuple(sorted(self._advert_bytes.values()))
        logger.info(
            "round %d: %d site(s) advertised; %d block group(s) formed",
            self._round_id,
            len(self._adverts),
            len(self._plan.groups),
        )
        return {
            site: encode_coordinator_message(
                KeyBundle(
                    federation_id=self._federation_id,
                    federation_sha256=self._federation_sha256,
                    round_id=self._round_id,
                    recipient=site,
                    advertisements=bundle,
                )
            )
            for site in sorted(self._adverts)
        }

    def _close_share_keys(self) -> dict[str, bytes]:
        plan = self._require_plan()
        senders = tuple(sorted(self._shares))
        for block, group in sorted(plan.groups.items()):
            mask_group = tuple(site for site in group if site in self._shares)
            reason = block_shortfall(mask_group, plan=plan, block=block, params=self._params, stage="shared keys")
            if reason is not None:
                self._failures[block] = reason
                continue
            self._mask_groups[block] = mask_group
            self._sums[block] = np.zeros(self._block_sizes[block] + 1, dtype=self._params.ring_dtype)
        inbox: dict[str, list[EncryptedShare]] = {site: [] for site in senders}
        for sender in senders:
            for share in self._shares[sender].shares:
                if share.peer in inbox:
                    inbox[share.peer].append(EncryptedShare(sender, share.nonce, share.ciphertext))
        logger.info("round %d: %d site(s) shared keys", self._round_id, len(senders))
        return {
            site: encode_coordinator_message(
                ShareDelivery(
                    federation_id=self._federation_id,
                    federation_sha256=self._federation_sha256,
                    round_id=self._round_id,
                    recipient=site,
                    share_senders=senders,
                    shares=tuple(sorted(inbox[site], key=lambda share: share.peer)),
                )
            )
            for site in senders
        }

    def _close_masked_input(self) -> dict[str, bytes]:
        plan = self._require_plan()
        survivors = tuple(sorted(self._masked_senders))
        dropped = tuple(sorted(set(self._shares) - self._masked_senders))
        for block, group in sorted(self._mask_groups.items()):
            contributors = tuple(site for site in group if site in self._masked_senders)
            reason = block_shortfall(
                contributors, plan=plan, block=block, params=self._params, stage="sent masked input"
            )
            if reason is not None:
                self._failures[block] = reason
            else:
                self._survivor_sets[block] = contributors
        logger.info(
            "round %d: %d masked input(s), %d dropped after sharing keys", self._round_id, len(survivors), len(dropped)
        )
        return {
            site: encode_coordinator_message(
                ConsistencyRequest(
                    federation_id=self._federation_id,
                    federation_sha256=self._federation_sha256,
                    round_id=self._round_id,
                    recipient=site,
                    blocks=tuple(
                        BlockSurvivors(block, self._survivor_sets[block]) for block in self._blocks_to_sign(site)
                    ),
                    statements=self._statements_for(site),
                )
            )
            for site in survivors
        }

    def _close_consistency(self) -> dict[str, bytes]:
        survivors = tuple(sorted(self._masked_senders))
        dropped = tuple(sorted(set(self._shares) - self._masked_senders))
        for block in sorted(self._survivor_sets):
            signed = len(self._signatures.get(block, {}))
            threshold = self._require_plan().thresholds[block]
            if signed < threshold:
                self._failures[block] = (
                    f"fewer than t survivors: {signed} signed the consistency check, t = {threshold}"
                )
        proofs = {
            block: BlockSignatures(block, tuple(SiteSignature(s, sig) for s, sig in sorted(by_site.items())))
            for block, by_site in sorted(self._signatures.items())
            if block not in self._failures
        }
        logger.info("round %d: %d site(s) signed the consistency check", self._round_id, len(self._signers))
        return {
            site: encode_coordinator_message(
                UnmaskRequest(
                    federation_id=self._federation_id,
                    federation_sha256=self._federation_sha256,
                    round_id=self._round_id,
                    recipient=site,
                    survivors=survivors,
                    dropped=dropped,
                    consistency=tuple(proof for block, proof in proofs.items() if site in self._signatures[block]),
                )
            )
            for site in sorted(self._signers)
        }

    def _close_unmask(self) -> dict[str, bytes]:
        for block in sorted(self._block_sizes):
            self._results[block] = self._block_result(block)
        done = sum(result.failure is None for result in self._results.values())
        logger.info("round %d: %d of %d block(s) aggregated", self._round_id, done, len(self._results))
        self._forget_round()
        return {}

    def _forget_round(self) -> None:
        """Drop the revealed shares and masked sums once the results are computed."""
        self._responses = {}
        self._sums = {}
        self._signatures = {}
        self._statements = {}

    # ----------------------------------------------------------------- unmask

    def _block_result(self, block: str) -> BlockResult:
        if is_head(block):
            return BlockResult(block, (), None, None, "not shareable: task heads never leave a site")
        if block in self._failures:
            return BlockResult(block, (), None, None, self._failures[block])
        if block not in self._mask_groups:
            return BlockResult(block, (), None, None, "fewer than min_contributors: no site offered it")
        try:
            contributors, weighted_sum, weight_sum = self._unmask_block(block)
        except _BlockFailure as failure:
            return BlockResult(block, (), None, None, str(failure))
        return BlockResult(block, contributors, weighted_sum, weight_sum, None)

    def _unmask_block(self, block: str) -> tuple[tuple[str, ...], np.ndarray, int]:
        plan = self._require_plan()
        group = self._mask_groups[block]
        contributors = tuple(site for site in group if site in self._masked_senders)
        dropped = tuple(site for site in group if site not in self._masked_senders)
        responders = [site for site in contributors if site in self._responses and site in self._signatures[block]]
        threshold = plan.thresholds[block]
        if len(responders) < threshold:
            raise _BlockFailure(f"fewer than t survivors: {len(responders)} answered unmask, t = {threshold}")
        shares_needed = plan.share_thresholds[block]

        def holders_of(site: str) -> tuple[str, ...]:
            if block not in plan.graphs:
                return tuple(responders[:shares_needed])
            found = tuple(r for r in responders if plan.holds_shares_of(block, r, site))
            if len(found) < shares_needed:
                raise _BlockFailure(
                    f"fewer than the shares needed: {len(found)} holder(s) of {site}'s secrets answered unmask, "
                    f"{shares_needed} needed"
                )
            return found[:shares_needed]

        self_mask_keys = [self._self_mask_key(block, site, holders_of(site)) for site in contributors]
        public = {peer: self._mask_public_key(peer, block) for peer in contributors}
        dropped_sites = []
        for site in dropped:  # its pairwise masks: with the contributors that held its shares (masked with it)
            peers = tuple((peer, public[peer]) for peer in contributors if plan.holds_shares_of(block, peer, site))
            dropped_sites.append(DroppedSite(site, self._mask_private_key(block, site, holders_of(site)), peers))
        accumulator = self._sums[block]
        try:
            remove_masks(
                accumulator,
                self_mask_keys=self_mask_keys,
                dropped=dropped_sites,
                context=MaskContext(self._federation_id, self._round_id, block),
                executor=self._executor,
                parts=self._parts,
            )
        except AllZeroSharedSecretError:
            raise _BlockFailure("an X25519 agreement is all zero") from None
        weighted_sum, weight_sum = dequantize_sum(accumulator, params=self._params)
        if not len(contributors) <= weight_sum <= len(contributors) * self._params.max_weight:
            raise _BlockFailure("weight sum out of range: a contributor's input is malformed")
        return contributors, weighted_sum, weight_sum

    def _rebuild(self, block: str, site: str, holders: tuple[str, ...]) -> int:
        xs = [self._x[holder] for holder in holders]
        ys = [self._responses[holder][(site, block)] for holder in holders]
        return shamir.reconstruct(xs, ys)

    def _self_mask_key(self, block: str, site: str, holders: tuple[str, ...]) -> bytes:
        value = self._rebuild(block, site, holders)
        entry = next(e for e in self._adverts[site].blocks if e.block == block)
        seed = value.to_bytes(32, "big") if value < _SEED_LIMIT else b""
        context = {"federation_id": self._federation_id, "round_id": self._round_id, "block": block, "site": site}
        if not seed or kdf.seed_commitment(seed, **context) != entry.seed_commitment:
            raise _BlockFailure(
                f"share verification failed: the self-mask seed of {site} does not match its commitment"
            )
        return kdf.self_mask_key(seed, **context)

    def _mask_private_key(self, block: str, site: str, holders: tuple[str, ...]) -> bytes:
        """A dropped site's mask private key, rebuilt and checked against the public key
        it signed."""
        value = self._rebuild(block, site, holders)
        private_key = value.to_bytes(32, "big") if value < _SEED_LIMIT else b""
        if not private_key or crypto.x25519_public_key(private_key) != self._mask_public_key(site, block):
            raise _BlockFailure(f"share verification failed: the mask key of {site} does not match its public key")
        return private_key

    def _mask_public_key(self, site: str, block: str) -> bytes:
        return next(entry.mask_public_key for entry in self._adverts[site].blocks if entry.block == block)
