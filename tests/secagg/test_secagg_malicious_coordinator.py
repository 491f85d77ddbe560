"""Attacks by a malicious coordinator, one test per attack, named after it.

The coordinator here is :class:`MaliciousCoordinator`, a test-only stand-in that crafts
every coordinator message itself (which advertisements each site sees, who shared keys,
which survivor set each site is asked to sign, which signatures are forwarded, who is
said to have dropped) and then tries to strip every mask from one site's input with
whatever shares it collected. Honest sites are the library's :class:`SiteStageMachine`.

Each attack must end in a refusal by an honest site (a ``ProtocolError`` or the opaque
``AuthenticationError``), so that the coordinator never holds ``t`` shares of both kinds
for one site, and :meth:`MaliciousCoordinator.recover` must come back empty: never a sum
over one site. ``test_split_view_attack_recovers_nothing`` recovered a site's exact update
(maximum error 1.9e-7) against the code before thresholds were public and the
consistency check existed.

Every test runs twice: on the complete graph of the block's group, and on the sparse
masking graph (``[aggregation.sparse]``, a ring of degree 2 over the six sites, the
sparsest there is: each site masks with and deals its shares to two neighbours, two shares
rebuild a secret, and a survivor must keep one masked neighbour in the survivor set).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import FEDERATION, FEDERATION_SHA256, Federation, make_keys

from blossom_secure import crypto
from blossom_secure.errors import AuthenticationError, ProtocolError
from blossom_secure.secagg import (
    BothSharesRequestedError,
    ConsistencyCheckError,
    InconsistentMessageError,
    MalformedMessageError,
    OutsideBlockGroupError,
    SecAggParams,
    SiteStageMachine,
    SparseGraph,
    WrongFederationError,
    kdf,
    shamir,
)
from blossom_secure.secagg.groups import share_x_coordinates
from blossom_secure.secagg.masking import apply_masks
from blossom_secure.secagg.messages import (
    AdvertiseKeys,
    BlockKeys,
    BlockSignatures,
    BlockSurvivors,
    ConsistencyRequest,
    EncryptedShare,
    KeyBundle,
    ShareDelivery,
    ShareKind,
    SiteSignature,
    UnmaskRequest,
    decode_site_message,
    encode_coordinator_message,
    encode_site_message,
)
from blossom_secure.secagg.quantize import dequantize_sum

SITES = ("s0", "s1", "s2", "s3", "s4", "s5")
BLOCK = "fusion"
# max_sites = 6 and the smallest threshold allowed for it (a strict majority), which is
# the most favourable to the attacker.
COMPLETE = SecAggParams(max_weight=100, max_group_size=6, threshold=4)
#: The same terms on the sparsest masking graph: a ring of degree 2 from six possible signers.
SPARSE = SparseGraph(2, from_sites=4)
PARAMS = COMPLETE
_SHARE_LIMIT = 1 << 256


@pytest.fixture(autouse=True, params=["complete", "sparse"])
def graph(request: pytest.FixtureRequest):
    """Run the test on the complete graph, then on the sparse one (the module's ``PARAMS``
    and ``GROUP_PARAMS`` with ``[aggregation.sparse]`` added)."""
    global PARAMS, GROUP_PARAMS
    saved = PARAMS, GROUP_PARAMS
    if request.param == "sparse":
        PARAMS = SecAggParams(max_weight=100, max_group_size=6, threshold=4, sparse=SPARSE)
        GROUP_PARAMS = SecAggParams(max_weight=100, max_group_size=6, block_groups={BLOCK: GROUP}, sparse=SPARSE)
    yield request.param
    PARAMS, GROUP_PARAMS = saved


class MaliciousCoordinator:
    """A coordinator that shows each honest site whatever it likes, and keeps everything.

    Attributes:
        fed: The honest sites (their stage machines, keys and true updates).
        refusals: Site id to the error with which it refused a crafted message.
    """

    def __init__(
        self, sites: Iterable[str] = SITES, params: SecAggParams | None = None, *, outsiders: Iterable[str] = ()
    ) -> None:
        """``sites`` run honest stage machines contributing ``BLOCK`` under ``params``
        (default: the module's ``PARAMS`` of the graph under test); ``outsiders`` are
        further roster members (with identity keys, no machine) that collude with the
        coordinator: see :meth:`outsider_advertisement`."""
        sites = tuple(sites)
        params = PARAMS if params is None else params
        keys = make_keys(sorted({*sites, *outsiders}))
        self.fed = Federation({site: (BLOCK,) for site in sites}, params=params, keys=keys)
        self.params = params
        self.sites = tuple(sorted(self.fed.sites))
        self.x = share_x_coordinates(self.fed.roster)
        self.refusals: dict[str, BaseException] = {}
        self.adverts: dict[str, bytes] = {}
        self.views: dict[str, tuple[str, ...]] = {}
        self.senders: dict[str, tuple[str, ...]] = {}
        self.shares: dict[str, object] = {}
        self.inbox: dict[str, set[str]] = {}  # site -> the peers whose shares it was handed
        self.masked: dict[str, object] = {}
        self.asked: dict[str, tuple[str, ...]] = {}
        self.signatures: dict[str, bytes] = {}
        self.revealed: list[tuple[str, object]] = []  # (revealer, RevealedShare)

    # -------------------------------------------------------------- plumbing

    def decode(self, data: bytes):
        return decode_site_message(
            data,
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=self.fed.round_id,
            roster=self.fed.roster,
            max_bytes=self.params.max_message_bytes,
        )

    def _send(self, site: str, method: str, message: object):
        """Hand an honest site a crafted message; its answer (decoded), or ``None`` if it
        refused (the first refusal is recorded; a site that refused is left alone)."""
        if site in self.refusals:
            return None
        try:
            answer = getattr(self.fed.sites[site], method)(encode_coordinator_message(message))
        except ProtocolError as exc:  # AuthenticationError included (a BlossomError, not a ProtocolError)
            self.refusals[site] = exc
            return None
        except AuthenticationError as exc:
            self.refusals[site] = exc
            return None
        return self.decode(answer)

    def outsider_advertisement(self, site: str) -> bytes:
        """An advertisement of ``BLOCK`` signed by ``site``, a roster member that colludes
        with the coordinator (its own stage machine would refuse to make one if the block's
        public group does not hold it)."""
        _, share_public_key = crypto.generate_x25519_key_pair()
        _, mask_public_key = crypto.generate_x25519_key_pair()
        commitment = kdf.seed_commitment(
            os.urandom(32), federation_id=FEDERATION, round_id=self.fed.round_id, block=BLOCK, site=site
        )
        advert = AdvertiseKeys(
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=self.fed.round_id,
            site_id=site,
            share_public_key=share_public_key,
            min_contributors=2,
            blocks=(BlockKeys(BLOCK, mask_public_key, commitment),),
        )
        return encode_site_message(advert, self.fed.keys[site])

    def outsider_signature(self, site: str, survivors: Iterable[str]) -> SiteSignature:
        """A consistency signature by colluding ``site`` over ``survivors`` (it signs anything)."""
        payload = kdf.consistency_payload(
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=self.fed.round_id,
            block=BLOCK,
            survivors=tuple(sorted(survivors)),
        )
        return SiteSignature(site, crypto.sign(self.fed.keys[site], payload))

    def _context(self, site: str) -> dict:
        return dict(
            federation_id=FEDERATION, federation_sha256=FEDERATION_SHA256, round_id=self.fed.round_id, recipient=site
        )

    # ---------------------------------------------------------------- stages

    def advertise(self) -> None:
        self.adverts = {site: self.fed.sites[site].advertise_keys() for site in self.sites}

    def share(self, views: Mapping[str, Iterable[str]]) -> None:
        """Show each site the advertisements of ``views[site]`` only."""
        for site, view in views.items():
            self.views[site] = tuple(sorted(view))
            bundle = KeyBundle(
                **self._context(site), advertisements=tuple(sorted(self.adverts[v] for v in self.views[site]))
            )
            answer = self._send(site, "share_keys", bundle)
            if answer is not None:
                self.shares[site] = answer

    def mask(self, senders: Mapping[str, Iterable[str]]) -> None:
        """Tell each site that ``senders[site]`` shared keys, and hand it their ciphertexts
        to it from the peers it shares a group with (those it sent shares to itself)."""
        for site, claimed in senders.items():
            if site not in self.shares:
                continue
            self.senders[site] = tuple(sorted(claimed))
            neighbours = {share.peer for share in self.shares[site].shares}
            inbox = [
                EncryptedShare(sender, share.nonce, share.ciphertext)
                for sender in self.senders[site]
                if sender in neighbours and sender in self.shares
                for share in self.shares[sender].shares
                if share.peer == site
            ]
            self.inbox[site] = {share.peer for share in inbox}
            delivery = ShareDelivery(**self._context(site), share_senders=self.senders[site], shares=tuple(inbox))
            answer = self._send(site, "masked_input", delivery)
            if answer is not None:
                self.masked[site] = answer

    def statements_for(self, site: str, survivors: Iterable[str]) -> tuple:
        """The genuine mask statements (sparse graph) of the ``survivors`` whose shares
        ``site`` was handed: what an honest coordinator forwards."""
        return tuple(
            statement
            for peer in sorted(survivors)
            if peer != site and peer in self.inbox.get(site, ()) and peer in self.masked
            for statement in self.masked[peer].statements
            if statement.block == BLOCK
        )

    def check(self, sets: Mapping[str, Iterable[str]], statements: Mapping[str, tuple] | None = None) -> None:
        """Ask each site to sign ``sets[site]`` as the block's survivors, forwarding
        ``statements[site]`` (default: the genuine mask statements it checks)."""
        for site, survivors in sets.items():
            self.asked[site] = tuple(sorted(survivors))
            forwarded = (statements or {}).get(site)
            if forwarded is None:
                forwarded = self.statements_for(site, self.asked[site])
            request = ConsistencyRequest(
                **self._context(site), blocks=(BlockSurvivors(BLOCK, self.asked[site]),), statements=forwarded
            )
            answer = self._send(site, "consistency_check", request)
            if answer is not None and answer.signatures:
                self.signatures[site] = answer.signatures[0].signature

    def signatures_over(self, survivors: Iterable[str]) -> tuple[SiteSignature, ...]:
        """Every collected signature made over exactly ``survivors``."""
        wanted = tuple(sorted(survivors))
        return tuple(SiteSignature(s, sig) for s, sig in sorted(self.signatures.items()) if self.asked[s] == wanted)

    def unmask(
        self, site: str, *, survivors: Iterable[str], dropped: Iterable[str], signatures: Iterable[SiteSignature]
    ) -> None:
        request = UnmaskRequest(
            **self._context(site),
            survivors=tuple(sorted(survivors)),
            dropped=tuple(sorted(dropped)),
            consistency=(BlockSignatures(BLOCK, tuple(sorted(signatures, key=lambda s: s.site))),),
        )
        answer = self._send(site, "unmask", request)
        if answer is not None:
            self.revealed.extend((site, share) for share in answer.shares)

    def collude(self, sites: Iterable[str]) -> None:
        """Model sites that collude with the coordinator: they hand over every share they
        hold, of both kinds (read from their machines after masked input)."""
        for site in sites:
            for (peer, block), (key_share, seed_share) in self.fed.sites[site]._masked.held.items():
                for kind, value in ((ShareKind.MASK_KEY, key_share), (ShareKind.SELF_MASK_SEED, seed_share)):
                    self.revealed.append((site, _Share(peer, block, kind, shamir.share_to_bytes(value))))

    # ------------------------------------------------------------- the payoff

    def rebuild(self, owner: str, kind: ShareKind) -> bytes | None:
        """``owner``'s seed or mask private key, if the shares collected rebuild it (checked
        against its signed advertisement), else ``None``."""
        points = {}
        for revealer, share in self.revealed:
            if share.peer == owner and share.block == BLOCK and share.kind == kind:
                points[self.x[revealer]] = shamir.share_from_bytes(share.value)
        if len(points) < 2:
            return None
        value = shamir.reconstruct(list(points), list(points.values()))
        if value >= _SHARE_LIMIT:
            return None
        secret = value.to_bytes(32, "big")
        entry = self.decode(self.adverts[owner]).blocks[0]
        if kind is ShareKind.SELF_MASK_SEED:
            commitment = kdf.seed_commitment(
                secret, federation_id=FEDERATION, round_id=self.fed.round_id, block=BLOCK, site=owner
            )
            return secret if commitment == entry.seed_commitment else None
        return secret if crypto.x25519_public_key(secret) == entry.mask_public_key else None

    def recover(self, target: str) -> np.ndarray | None:
        """Try to strip every mask from ``target``'s masked input: its update alone, or
        ``None`` when the shares collected do not allow it."""
        masked = self.masked.get(target)
        vectors = [entry.vector for entry in masked.blocks if entry.block == BLOCK] if masked else []
        if not vectors:
            return None
        vector = vectors[0].copy()
        context = dict(federation_id=FEDERATION, round_id=self.fed.round_id, block=BLOCK)
        seed = self.rebuild(target, ShareKind.SELF_MASK_SEED)
        if seed is None:
            return None
        masks = [(kdf.self_mask_key(seed, site=target, **context), -1)]
        public = {s: self.decode(a).blocks[0].mask_public_key for s, a in self.adverts.items()}
        own_key = self.rebuild(target, ShareKind.MASK_KEY)
        stated = [statement.peers for statement in masked.statements if statement.block == BLOCK]
        masked_with = stated[0] if stated else sorted((set(self.views[target]) & set(self.senders[target])) - {target})
        for peer in masked_with:
            peer_key = self.rebuild(peer, ShareKind.MASK_KEY)
            if own_key is not None:
                secret = crypto.x25519_shared_secret(own_key, public[peer])
            elif peer_key is not None:
                secret = crypto.x25519_shared_secret(peer_key, public[target])
            else:
                return None
            key = kdf.pairwise_mask_key(secret, sites=(target, peer), **context)
            masks.append((key, -1 if target < peer else 1))
        apply_masks(vector, masks)
        weighted, weight = dequantize_sum(vector, params=self.params)
        if weight != self.fed.contributions[target].weight:
            return None
        return weighted / weight

    def recovers_nobody(self) -> bool:
        return all(self.recover(site) is None for site in self.sites)

    def error(self, target: str) -> float:
        """Largest error of a recovered update against ``target``'s true update."""
        recovered = self.recover(target)
        truth = self.fed.contributions[target].blocks[BLOCK].astype(np.float64)
        return float(np.abs(recovered - truth).max())


class _Share:
    """A share a colluding site hands over (same fields as a revealed share)."""

    def __init__(self, peer: str, block: str, kind: ShareKind, value: bytes) -> None:
        self.peer, self.block, self.kind, self.value = peer, block, kind, value


def everyone(sites: Iterable[str] = SITES, **views: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each site's view: ``views[site]`` where given, else every site."""
    return {site: views.get(site, tuple(SITES)) for site in sites}


def mutual(views: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Who each site is told shared keys: the sites of its view whose own view holds it
    (the ones that did send it shares), so that no site balks at a missing ciphertext."""
    return {site: tuple(v for v in view if v == site or site in views[v]) for site, view in views.items()}


def honest_until_masked_input(attacker: MaliciousCoordinator) -> None:
    attacker.advertise()
    attacker.share(everyone())
    attacker.mask(everyone())


# ------------------------------------------------------------ split views


def test_split_view_attack_recovers_nothing(graph: str) -> None:
    """The reported attack: s0 is shown a group of two (with s1), everyone else a group of
    six; then s0 and s1 are told that all survived and the rest that s1 dropped, so that
    s0's seed comes from {s0, s1} and s1's mask key from the four others."""
    attacker = MaliciousCoordinator()
    attacker.advertise()
    attacker.share(everyone(s0=("s0", "s1")))
    attacker.mask(everyone(s0=("s0", "s1"), **{s: tuple(v for v in SITES if v != "s0") for s in SITES[2:]}))
    # s0 refuses a group of two (t = 4 is public): it shares nothing and masks nothing.
    assert attacker.shares["s0"].shares == ()
    assert attacker.masked["s0"].blocks == ()
    attacker.check({"s0": ("s0", "s1"), "s1": SITES, **{s: SITES[2:] for s in SITES[2:]}})
    for site in ("s0", "s1"):
        attacker.unmask(site, survivors=attacker.senders[site], dropped=(), signatures=attacker.signatures_over(SITES))
    rest = SITES[2:]
    for site in rest:
        attacker.unmask(site, survivors=rest, dropped=("s1",), signatures=attacker.signatures_over(rest))
    assert attacker.recovers_nobody()
    # s1 expected s0's shares (it was told s0 shared keys); the four others hold 4
    # signatures over their set, reveal s1's mask-key share, but s0 never masked with s1.
    # On the sparse ring s0 is no neighbour of s1's: s1 expects nothing of it, and finds
    # only its own signature over the set of six.
    expected = InconsistentMessageError if graph == "complete" else ConsistencyCheckError
    assert isinstance(attacker.refusals["s1"], expected)
    assert attacker.rebuild("s0", ShareKind.SELF_MASK_SEED) is None


def test_split_view_with_a_group_of_t_recovers_nothing(graph: str) -> None:
    """The attacker adapts: s0 is shown exactly t = 4 sites, so it accepts the group; the
    attacker then asks s0-s3 to sign the four and s4, s5 to sign a set without s1. (On the
    sparse graph s0's ring of four gives it other neighbours than the ring of six gives
    the others: it refuses the share delivery and sends nothing.)"""
    attacker = MaliciousCoordinator()
    small = ("s0", "s1", "s2", "s3")
    attacker.advertise()
    attacker.share(everyone(s0=small))
    attacker.mask(mutual(everyone(s0=small)))
    if graph == "complete":
        assert attacker.masked["s0"].blocks != ()  # s0 takes part, with threshold 4
        assert attacker.refusals == {}
    else:
        assert isinstance(attacker.refusals.pop("s0"), InconsistentMessageError) and "s0" not in attacker.masked
        assert attacker.refusals == {}
    without_s1 = ("s2", "s3", "s4", "s5")  # s4 and s5 were told s0 did not share keys
    attacker.check({**{s: small for s in small}, "s4": without_s1, "s5": without_s1})
    for site in small:
        others = tuple(v for v in attacker.senders[site] if v not in small)
        attacker.unmask(site, survivors=small, dropped=others, signatures=attacker.signatures_over(small))
    for site in ("s4", "s5"):
        attacker.unmask(site, survivors=without_s1, dropped=("s1",), signatures=attacker.signatures_over(without_s1))
    # 2 signatures < t. (On the sparse ring, s4 and s5 left the set unsigned: in it a
    # member keeps none of its neighbours. Signatures for a set a site did not sign are
    # refused as such.)
    expected = ConsistencyCheckError if graph == "complete" else InconsistentMessageError
    assert isinstance(attacker.refusals["s4"], expected) and isinstance(attacker.refusals["s5"], expected)
    assert attacker.recovers_nobody()


def test_different_group_per_site_recovers_nothing(graph: str) -> None:
    """Each site is shown a different group (each of at least t sites) and asked to sign
    its own group: no two sites sign the same set, so none gathers t signatures."""
    attacker = MaliciousCoordinator()
    views = {
        "s0": ("s0", "s1", "s2", "s3", "s5"),
        "s1": ("s0", "s1", "s4", "s5"),
        "s2": ("s0", "s2", "s3", "s4", "s5"),
        "s3": SITES,
        "s4": ("s1", "s2", "s3", "s4"),
        "s5": ("s0", "s1", "s2", "s5"),
    }
    attacker.advertise()
    attacker.share(views)
    attacker.mask(mutual(views))
    if graph == "sparse":
        # Each view gives its own ring: the deliveries hold other neighbours' shares than
        # the sites expect, and every site that sees it refuses before masking.
        assert attacker.refusals and all(isinstance(e, InconsistentMessageError) for e in attacker.refusals.values())
        assert attacker.recovers_nobody()
        return
    assert attacker.refusals == {}
    attacker.check(attacker.senders)
    assert len(set(attacker.asked.values())) == len(SITES) and len(attacker.signatures) == len(SITES)
    for site in SITES:  # forward the signatures of the members of its set, over their own sets
        members = attacker.asked[site]
        signatures = tuple(SiteSignature(s, sig) for s, sig in sorted(attacker.signatures.items()) if s in members)
        attacker.unmask(site, survivors=attacker.senders[site], dropped=(), signatures=signatures)
    assert set(attacker.refusals) == set(SITES)
    assert all(isinstance(e, (AuthenticationError, ConsistencyCheckError)) for e in attacker.refusals.values())
    assert attacker.recovers_nobody()


def test_shrinking_view_by_omitting_honest_advertisements_recovers_nothing(graph: str) -> None:
    """The attacker drops honest sites' advertisements from s0's bundle, one by one: below
    t = 4 s0 withholds its input; at t it takes part, but the others' view (all six) and
    s0's (four) give different survivor sets to sign."""
    for size in (2, 3, 4, 5):
        attacker = MaliciousCoordinator()
        shown = SITES[:size]
        attacker.advertise()
        attacker.share(everyone(s0=shown))
        attacker.mask(mutual(everyone(s0=shown)))
        if size < PARAMS.threshold:
            assert attacker.masked["s0"].blocks == ()
            continue
        attacker.check({site: attacker.senders[site] if site != "s0" else shown for site in SITES})
        for site in SITES:
            attacker.unmask(
                site,
                survivors=attacker.asked[site],
                dropped=tuple(v for v in attacker.senders[site] if v not in attacker.asked[site]),
                signatures=attacker.signatures_over(attacker.asked[site]),
            )
        # Only s0 signed its small set. On the sparse graph a ring of fewer sites gives s0
        # other neighbours: it refuses the share delivery instead (a ring of five over six
        # sites may agree on s0's neighbours; then only s0 signs its set, as above).
        refusal = attacker.refusals["s0"]
        assert isinstance(refusal, ConsistencyCheckError) or (
            graph == "sparse" and isinstance(refusal, InconsistentMessageError) and "s0" not in attacker.masked
        )
        assert attacker.recover("s0") is None


def test_inconsistent_dropped_sets_across_sites_refused() -> None:
    """Everyone saw the same group and every input arrived; the attacker tells s0-s2 that
    all survived (they reveal s5's seed share) and s3, s4 that s5 dropped (they would
    reveal s5's mask-key share)."""
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    attacker.check({site: SITES for site in SITES})
    signatures = attacker.signatures_over(SITES)
    for site in ("s0", "s1", "s2", "s5"):
        attacker.unmask(site, survivors=SITES, dropped=(), signatures=signatures)
    for site in ("s3", "s4"):
        attacker.unmask(site, survivors=SITES[:5], dropped=("s5",), signatures=signatures)
    assert isinstance(attacker.refusals["s3"], ConsistencyCheckError)
    assert isinstance(attacker.refusals["s4"], ConsistencyCheckError)
    assert attacker.rebuild("s5", ShareKind.MASK_KEY) is None
    assert attacker.recovers_nobody()


def test_inconsistent_survivor_sets_to_sign_refused() -> None:
    """The attacker asks half the sites to sign all six and the other half to sign a set
    without s5: neither set gathers t = 4 signatures (s5 will not sign a set without
    itself), so no one unmasks anything."""
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    without_s5 = SITES[:5]
    attacker.check({**{s: SITES for s in ("s0", "s1", "s2")}, **{s: without_s5 for s in ("s3", "s4", "s5")}})
    assert isinstance(attacker.refusals.pop("s5"), InconsistentMessageError)  # not in the set it was sent
    for site in ("s0", "s1", "s2"):
        attacker.unmask(site, survivors=SITES, dropped=(), signatures=attacker.signatures_over(SITES))
    for site in ("s3", "s4"):
        attacker.unmask(site, survivors=without_s5, dropped=("s5",), signatures=attacker.signatures_over(without_s5))
    assert set(attacker.refusals) == {"s0", "s1", "s2", "s3", "s4"}
    assert all(isinstance(e, ConsistencyCheckError) for e in attacker.refusals.values())
    assert attacker.revealed == []
    assert attacker.recovers_nobody()


# ------------------------------------------------------ forged signatures


def signed_round(attacker: MaliciousCoordinator) -> tuple[SiteSignature, ...]:
    honest_until_masked_input(attacker)
    attacker.check({site: SITES for site in SITES})
    return attacker.signatures_over(SITES)


def test_forged_consistency_signature_refused() -> None:
    attacker = MaliciousCoordinator()
    signatures = signed_round(attacker)
    first = signatures[0]
    forged = SiteSignature(first.site, bytes([first.signature[0] ^ 1]) + first.signature[1:])
    attacker.unmask("s3", survivors=SITES, dropped=(), signatures=(forged, *signatures[1:4]))
    assert isinstance(attacker.refusals["s3"], AuthenticationError)
    assert attacker.revealed == []


def test_duplicated_consistency_signature_refused() -> None:
    """Padding the count: one signer listed twice (not canonical, refused by the decoder),
    or one site's signature presented as another's (does not verify)."""
    attacker = MaliciousCoordinator()
    signatures = signed_round(attacker)
    three = signatures[:3]
    twice = BlockSignatures.__new__(BlockSignatures)
    object.__setattr__(twice, "block", BLOCK)
    object.__setattr__(twice, "signatures", (three[0], three[0], three[1], three[2]))
    request = UnmaskRequest.__new__(UnmaskRequest)
    for name, value in {
        **attacker._context("s4"),
        "survivors": SITES,
        "dropped": (),
        "consistency": (twice,),
    }.items():
        object.__setattr__(request, name, value)
    with pytest.raises(MalformedMessageError):
        attacker.fed.sites["s4"].unmask(encode_coordinator_message(request))
    borrowed = SiteSignature("s5", three[0].signature)  # s0's signature under s5's name
    attacker.unmask("s4", survivors=SITES, dropped=(), signatures=(*three, borrowed))
    assert isinstance(attacker.refusals["s4"], AuthenticationError)
    assert attacker.revealed == []


def test_consistency_signatures_over_a_different_set_refused() -> None:
    """Signatures collected over one set presented as signatures over another."""
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    without_s5 = SITES[:5]
    attacker.check({**{s: without_s5 for s in ("s0", "s1", "s2", "s3")}, "s4": SITES, "s5": SITES})
    over_other_set = attacker.signatures_over(without_s5)
    assert len(over_other_set) == 4
    attacker.unmask("s4", survivors=SITES, dropped=(), signatures=over_other_set)
    assert isinstance(attacker.refusals["s4"], AuthenticationError)  # s4 signed SITES; these are over 5 sites
    mixed = (*over_other_set[:2], *attacker.signatures_over(SITES))
    attacker.unmask("s5", survivors=SITES, dropped=(), signatures=mixed)
    assert isinstance(attacker.refusals["s5"], (AuthenticationError, ConsistencyCheckError))
    assert attacker.revealed == []


def test_signature_from_outside_the_signed_set_refused() -> None:
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    survivors = SITES[:5]
    attacker.check({**{s: survivors for s in survivors}, "s5": SITES})
    extra = SiteSignature("s5", attacker.signatures["s5"])
    signatures = (*attacker.signatures_over(survivors)[:3], extra)
    attacker.unmask("s0", survivors=survivors, dropped=("s5",), signatures=signatures)
    assert isinstance(attacker.refusals["s0"], ConsistencyCheckError)


def test_fewer_than_t_consistency_signatures_refused() -> None:
    attacker = MaliciousCoordinator()
    signatures = signed_round(attacker)
    attacker.unmask("s2", survivors=SITES, dropped=(), signatures=signatures[: PARAMS.threshold - 1])
    assert isinstance(attacker.refusals["s2"], ConsistencyCheckError)
    attacker.unmask("s3", survivors=SITES, dropped=(), signatures=())
    assert isinstance(attacker.refusals["s3"], ConsistencyCheckError)
    assert attacker.revealed == []


def test_unmask_request_contradicting_the_signed_set_refused() -> None:
    """Valid signatures over all six, but the request says s5 dropped (asking for s5's
    mask-key share instead of its seed share)."""
    attacker = MaliciousCoordinator()
    signatures = signed_round(attacker)
    attacker.unmask("s0", survivors=SITES[:5], dropped=("s5",), signatures=signatures)
    assert isinstance(attacker.refusals["s0"], ConsistencyCheckError)
    assert attacker.revealed == []


def test_second_unmask_request_asking_for_the_other_share_refused() -> None:
    """After s0 revealed s5's seed share (s5 survived), a second request in the same round
    asking for s5's mask-key share is refused; the other kind never leaves."""
    attacker = MaliciousCoordinator()
    signatures = signed_round(attacker)
    attacker.unmask("s0", survivors=SITES, dropped=(), signatures=signatures)
    assert "s0" not in attacker.refusals
    attacker.unmask("s0", survivors=SITES[:5], dropped=("s5",), signatures=signatures)
    assert isinstance(attacker.refusals["s0"], BothSharesRequestedError)
    assert {share.kind for _, share in attacker.revealed} == {ShareKind.SELF_MASK_SEED}


def test_consistency_request_naming_sites_outside_the_group_refused() -> None:
    attacker = MaliciousCoordinator()
    small = ("s0", "s1", "s2", "s3")
    attacker.advertise()
    attacker.share(everyone(s0=small))
    attacker.mask(mutual(everyone(s0=small)))
    attacker.check({"s0": SITES})
    assert isinstance(attacker.refusals["s0"], InconsistentMessageError)


def test_consistency_request_without_the_recipient_refused() -> None:
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    attacker.check({"s0": SITES[1:]})
    assert isinstance(attacker.refusals["s0"], InconsistentMessageError)


def test_each_site_signs_one_survivor_set_per_round() -> None:
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    attacker.check({"s0": SITES})
    attacker.check({"s0": SITES[:5]})
    assert isinstance(attacker.refusals["s0"], ProtocolError)
    assert attacker.asked["s0"] == SITES[:5] and len(attacker.signatures) == 1


# --------------------------------------------------- federation file hash


def test_site_holding_another_federation_file_refuses_the_round() -> None:
    """Every message binds the SHA-256 of the federation file: a site whose file differs
    (other thresholds, say) refuses the others' advertisements, and the coordinator its."""
    fed = Federation({site: (BLOCK,) for site in SITES[:4]}, params=PARAMS)
    fed.sites["s3"] = fed.new_site("s3", federation_sha256=bytes(32))
    with pytest.raises(WrongFederationError, match="SHA-256"):
        fed.advertise()
    fed = Federation({site: (BLOCK,) for site in SITES[:4]}, params=PARAMS)
    odd = fed.new_site("s3", federation_sha256=bytes(32))
    adverts = [fed.sites[s].advertise_keys() for s in SITES[:3]]
    bundle = KeyBundle(
        federation_id=FEDERATION,
        federation_sha256=bytes(32),
        round_id=fed.round_id,
        recipient="s3",
        advertisements=tuple(sorted([*adverts, odd.advertise_keys()])),
    )
    with pytest.raises(WrongFederationError):
        odd.share_keys(encode_coordinator_message(bundle))


def test_share_ciphertext_under_another_federation_file_does_not_decrypt() -> None:
    key, nonce = bytes(range(32)), bytes(12)
    context = dict(federation_id=FEDERATION, round_id=1, sender="s0", recipient="s1")
    ciphertext = crypto.aead_encrypt(
        key, nonce, b"shares", kdf.share_associated_data(federation_sha256=FEDERATION_SHA256, **context)
    )
    with pytest.raises(AuthenticationError):
        crypto.aead_decrypt(key, nonce, ciphertext, kdf.share_associated_data(federation_sha256=bytes(32), **context))


# ---------------------------------------------- what still holds and breaks


def test_honest_round_through_the_attackers_plumbing_recovers_only_what_it_may() -> None:
    """Control: with an honest script the sum comes out and the attacker rebuilds exactly
    what the protocol gives it (survivors' seeds, dropped sites' mask keys), no update."""
    attacker = MaliciousCoordinator()
    attacker.advertise()
    attacker.share(everyone())
    attacker.mask({site: SITES for site in SITES if site != "s5"})  # s5 shared keys, then dropped
    survivors = SITES[:5]
    attacker.check({site: survivors for site in survivors})
    for site in survivors:
        attacker.unmask(site, survivors=survivors, dropped=("s5",), signatures=attacker.signatures_over(survivors))
    assert attacker.refusals == {}
    assert attacker.rebuild("s5", ShareKind.MASK_KEY) is not None
    assert all(attacker.rebuild(s, ShareKind.SELF_MASK_SEED) is not None for s in survivors)
    assert attacker.rebuild("s5", ShareKind.SELF_MASK_SEED) is None
    assert attacker.recovers_nobody()


def test_collusion_of_t_sites_with_the_coordinator_still_recovers_an_update() -> None:
    """What the protocol does not protect against (threat-model.md): as many holders of a
    member's shares as the shares needed to rebuild its secrets (``t_b`` of the group on the
    complete graph, ``share_threshold`` of its neighbours on the sparse one) that hand
    them to the coordinator let it unmask that member. This also shows that
    :meth:`MaliciousCoordinator.recover` works when the shares are there."""
    attacker = MaliciousCoordinator()
    honest_until_masked_input(attacker)
    needed = PARAMS.share_threshold(BLOCK)
    holders = sorted(attacker.inbox["s0"])  # s0's neighbours: they hold its shares
    assert len(holders) == (2 if PARAMS.sparse else 5)
    attacker.collude(holders[:needed])
    assert attacker.error("s0") <= 2.0 ** -(PARAMS.scale_bits + 1) + 1e-7
    fewer = MaliciousCoordinator()
    honest_until_masked_input(fewer)
    fewer.collude(sorted(fewer.inbox["s0"])[: needed - 1])  # one short: nothing
    assert fewer.recovers_nobody()


# ------------------------------------------------------ public block groups
#
# With a public group P_b (the federation file's [aggregation.groups]) the threshold need
# only be a strict majority of |P_b|, not of max_sites. That holds only if no site outside
# P_b ever takes part in the block: the attacks below try to bring one in, or to split P_b.

GROUP = ("s0", "s1", "s2", "s3")  # P_b of BLOCK; s4 and s5 are roster members outside it
# t_b = 3 = floor(2 * 4 / 3) + 1, the default for a group of four (2 * 3 > 4); against
# max_sites = 6 alone, 3 would be refused.
GROUP_PARAMS = SecAggParams(max_weight=100, max_group_size=6, block_groups={BLOCK: GROUP})
OUTSIDERS = ("s4", "s5")


def group_attacker() -> MaliciousCoordinator:
    attacker = MaliciousCoordinator(GROUP, GROUP_PARAMS, outsiders=OUTSIDERS)
    assert GROUP_PARAMS.block_threshold(BLOCK) == 3 and attacker.fed.roster.keys() == set(SITES)
    attacker.advertise()
    for outsider in OUTSIDERS:
        attacker.adverts[outsider] = attacker.outsider_advertisement(outsider)
    return attacker


def test_split_view_attack_with_a_declared_group_recovers_nothing() -> None:
    """The reported attack against a block with a public group: s0 is shown a group of two
    (s0, s1); it refuses (t_b = 3 is public). The attacker adapts and pads s0's view to
    t_b with s4, a roster member outside P_b that colludes with it and signs an
    advertisement of the block: s0 refuses the bundle outright, and shares nothing."""
    for shown, refusal in ((("s0", "s1"), None), (("s0", "s1", "s4"), OutsideBlockGroupError)):
        attacker = group_attacker()
        attacker.share({"s0": shown, **{site: GROUP for site in GROUP[1:]}})
        if refusal is None:
            assert attacker.shares["s0"].shares == ()  # a group below t_b: nothing shared
        else:
            assert isinstance(attacker.refusals["s0"], refusal) and "s0" not in attacker.shares
        rest = GROUP[1:]  # told that s0 did not share keys
        attacker.mask({"s0": ("s0", "s1"), **{site: rest for site in rest}})
        assert "s0" not in attacker.masked or attacker.masked["s0"].blocks == ()
        attacker.check({site: rest for site in rest})
        for site in rest:
            attacker.unmask(site, survivors=rest, dropped=(), signatures=attacker.signatures_over(rest))
        assert not any(share.peer == "s0" for _, share in attacker.revealed)  # nothing of s0 revealed
        assert attacker.recovers_nobody()


def test_shrinking_view_with_a_declared_group_recovers_nothing() -> None:
    """The attacker drops members' advertisements from s0's bundle, one by one: below
    t_b = 3 s0 withholds its input; at t_b it takes part, but its view (three) and the
    others' (four, or three without s0 for s3) give different survivor sets to sign, and
    none gathers t_b signatures."""
    for size in (2, 3):
        attacker = group_attacker()
        shown = GROUP[:size]
        views = {site: shown if site == "s0" else GROUP for site in GROUP}
        attacker.share(views)
        attacker.mask(mutual(views))
        if size < GROUP_PARAMS.block_threshold(BLOCK):
            assert attacker.masked["s0"].blocks == ()
            continue
        assert attacker.refusals == {}
        attacker.check({site: attacker.senders[site] if site != "s0" else shown for site in GROUP})
        assert len(set(attacker.asked.values())) == 3  # s0's three, the four, s3's three without s0
        for site in GROUP:
            attacker.unmask(
                site,
                survivors=attacker.asked[site],
                dropped=tuple(v for v in attacker.senders[site] if v not in attacker.asked[site]),
                signatures=attacker.signatures_over(attacker.asked[site]),
            )
        assert set(attacker.refusals) == set(GROUP)
        assert all(isinstance(e, ConsistencyCheckError) for e in attacker.refusals.values())
        assert attacker.revealed == [] and attacker.recovers_nobody()


def test_group_view_with_an_outsider_added_to_all_of_e_b_refused() -> None:
    """Every member of P_b is shown its whole group plus s4 (outside it): the sum would be
    over five sites, and s4's colluding signatures would count toward t_b. Every member
    refuses the bundle; nobody shares anything."""
    attacker = group_attacker()
    attacker.share({site: (*GROUP, "s4") for site in GROUP})
    assert set(attacker.refusals) == set(GROUP)
    assert all(isinstance(e, OutsideBlockGroupError) for e in attacker.refusals.values())
    assert attacker.shares == {}


def test_survivor_set_naming_a_site_outside_the_public_group_refused() -> None:
    attacker = group_attacker()
    attacker.share({site: GROUP for site in GROUP})
    attacker.mask({site: GROUP for site in GROUP})
    assert attacker.refusals == {}
    attacker.check({"s0": (*GROUP, "s4"), "s1": ("s0", "s1", "s5")})
    assert isinstance(attacker.refusals["s0"], OutsideBlockGroupError)
    assert isinstance(attacker.refusals["s1"], OutsideBlockGroupError)
    assert "s0" not in attacker.signatures and "s1" not in attacker.signatures


def test_consistency_signatures_padded_by_outsiders_refused() -> None:
    """Two members are asked to sign a set without s3 (which did send masked input), and
    the attacker pads their two signatures to t_b with colluding outsiders' signatures over
    the same set, hoping the two would reveal s3's mask-key share."""
    attacker = group_attacker()
    attacker.share({site: GROUP for site in GROUP})
    attacker.mask({site: GROUP for site in GROUP})
    without_s3 = ("s0", "s1", "s2")
    attacker.check({"s0": without_s3, "s1": without_s3})
    padded = (*attacker.signatures_over(without_s3), attacker.outsider_signature("s4", without_s3))
    for site in ("s0", "s1"):
        attacker.unmask(site, survivors=without_s3, dropped=("s3",), signatures=padded)
        assert isinstance(attacker.refusals[site], OutsideBlockGroupError)
    assert attacker.revealed == []
    assert attacker.rebuild("s3", ShareKind.MASK_KEY) is None


def test_honest_coordinator_refuses_an_advertisement_from_outside_the_public_group() -> None:
    """The coordinator side stays consistent: it never forms a group with an outsider, and
    an outsider's own stage machine will not contribute the block at all."""
    attacker = MaliciousCoordinator(GROUP, GROUP_PARAMS, outsiders=OUTSIDERS)
    coordinator = attacker.fed.coordinator
    with pytest.raises(OutsideBlockGroupError):
        coordinator.receive(attacker.outsider_advertisement("s4"))
    assert coordinator.advertised == ()
    with pytest.raises(ValueError, match="not in the public group"):  # s4 asked to contribute BLOCK
        SiteStageMachine(
            site_id="s4",
            federation_id=FEDERATION,
            federation_sha256=FEDERATION_SHA256,
            round_id=attacker.fed.round_id,
            roster=attacker.fed.roster,
            identity_key=attacker.fed.keys["s4"],
            block_sizes=attacker.fed.sizes,
            params=GROUP_PARAMS,
            contribution=attacker.fed.contributions["s0"],
        )
    for site in GROUP:
        coordinator.receive(attacker.fed.sites[site].advertise_keys())
    coordinator.close_stage()
    assert coordinator.advertised == GROUP


# Ten roster members, P_b of six (s0-s5), t_b = 4: the smallest strict majority of the
# group, refused against max_sites = 10 (which would need 6).
WIDE_GROUP = SITES
WIDE_OUTSIDERS = ("s6", "s7", "s8", "s9")
WIDE_PARAMS = SecAggParams(
    max_weight=100, max_group_size=10, block_groups={BLOCK: WIDE_GROUP}, block_thresholds={BLOCK: 4}
)


def test_two_disjoint_halves_of_the_public_group_recover_nothing() -> None:
    """The attacker shows each half of P_b (three sites each) only its own half, as if each
    were the whole group, so that each half could unmask on its own. Each half is below t_b
    and refused; padded to t_b with a colluding outsider it is refused for the outsider;
    padded with members of the other half, those members see one view each (and share
    keys only within it), so the second group never gathers t_b members who shared keys,
    let alone t_b signatures."""
    low, high = WIDE_GROUP[:3], WIDE_GROUP[3:]
    with pytest.raises(ValueError, match="more than half of max_group_size"):
        SecAggParams(max_weight=100, max_group_size=10, threshold=4)  # the rule without a group

    def attacker_for() -> MaliciousCoordinator:
        attacker = MaliciousCoordinator(WIDE_GROUP, WIDE_PARAMS, outsiders=WIDE_OUTSIDERS)
        attacker.advertise()
        for outsider in WIDE_OUTSIDERS:
            attacker.adverts[outsider] = attacker.outsider_advertisement(outsider)
        return attacker

    halves = attacker_for()
    halves.share({**{s: low for s in low}, **{s: high for s in high}})
    assert all(halves.shares[s].shares == () for s in WIDE_GROUP)  # 3 < t_b = 4: nothing shared
    halves.mask({**{s: low for s in low}, **{s: high for s in high}})
    assert all(halves.masked[s].blocks == () for s in WIDE_GROUP)
    assert halves.recovers_nobody()

    padded = attacker_for()
    padded.share({**{s: (*low, "s6") for s in low}, **{s: (*high, "s7") for s in high}})
    assert set(padded.refusals) == set(WIDE_GROUP)
    assert all(isinstance(e, OutsideBlockGroupError) for e in padded.refusals.values())

    # Overlapping "halves" of t_b = 4: s2 and s3 can be in only one view each.
    first, second = ("s0", "s1", "s2", "s3"), ("s2", "s3", "s4", "s5")
    views = {**{s: first for s in first}, "s4": second, "s5": second}
    overlap = attacker_for()
    overlap.share(views)
    overlap.mask(mutual(views))  # s4 and s5 hear that only the two of them shared keys: 2 < t_b
    assert overlap.refusals == {} and overlap.masked["s4"].blocks == () and overlap.masked["s5"].blocks == ()
    lied_to = attacker_for()  # told that s2 and s3 shared keys too: their ciphertexts are missing
    lied_to.share(views)
    lied_to.mask({"s4": second, "s5": second})
    assert isinstance(lied_to.refusals["s4"], InconsistentMessageError) and "s4" not in lied_to.masked
    # The first group is a legitimate group of t_b members: its sum may come out, no more.
    overlap.check({s: first for s in first})
    for site in first:
        overlap.unmask(site, survivors=first, dropped=(), signatures=overlap.signatures_over(first))
    assert overlap.refusals == {}
    assert not any(share.peer in ("s4", "s5") for _, share in overlap.revealed)
    assert overlap.recovers_nobody()
    # Two members' signatures padded to t_b by colluding outsiders are refused.
    short = attacker_for()
    short.share(views)
    short.mask(mutual(views))
    short.check({s: first for s in first})
    two_and_outsiders = (
        *short.signatures_over(first)[:2],
        short.outsider_signature("s6", first),
        short.outsider_signature("s7", first),
    )
    short.unmask("s0", survivors=first, dropped=(), signatures=two_and_outsiders)
    assert isinstance(short.refusals["s0"], OutsideBlockGroupError) and short.revealed == []


@settings(max_examples=200, deadline=None)
@given(max_sites=st.integers(2, 64), data=st.data())
def test_every_accepted_group_threshold_is_a_strict_majority_of_its_group(max_sites: int, data: st.DataObject) -> None:
    """For any declared group and any threshold (or none), parameters are accepted only if
    2 t_b > |P_b| and t_b <= |P_b|: no two disjoint sets of members can both reach t_b.
    Blocks without a group keep the rule against max_sites."""
    size = data.draw(st.integers(2, max_sites), label="|P_b|")
    members = tuple(f"m{i}" for i in range(size))
    minimum = data.draw(st.integers(2, max_sites), label="min_contributors")
    threshold = data.draw(st.none() | st.integers(1, size + 2), label="t_b")
    kwargs = dict(max_group_size=max_sites, max_weight=10, min_contributors=minimum, block_groups={BLOCK: members})
    if threshold is not None:
        kwargs["block_thresholds"] = {BLOCK: threshold}
    try:
        params = SecAggParams(**kwargs)
    except ValueError:
        assert threshold is not None and not (minimum <= threshold <= size and 2 * threshold > size)
        return
    t = params.block_threshold(BLOCK)
    assert 2 * t > size and t <= size
    assert threshold is None or minimum <= t
    assert params.block_group(BLOCK) == tuple(sorted(members))
    assert not params.is_group_member(BLOCK, "outsider") and params.is_group_member("encoder.image", "outsider")
    assert 2 * params.block_threshold("encoder.image") > max_sites


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_any_views_within_a_declared_group_let_at_most_one_survivor_set_reach_t(data: st.DataObject) -> None:
    """Whatever group each member is shown (any subset holding itself, sometimes with the
    colluding outsider s5) and whatever set each is asked to sign, through the real stage
    machines: sites shown the outsider refuse, and at most one survivor set of the block
    gathers t_b signatures of members."""
    size = data.draw(st.integers(3, 5), label="|P_b|")
    members = SITES[:size]
    threshold = data.draw(st.integers(size // 2 + 1, size), label="t_b")
    params = SecAggParams(max_weight=100, max_group_size=6, block_groups={BLOCK: members},
                          block_thresholds={BLOCK: threshold})
    attacker = MaliciousCoordinator(members, params, outsiders=("s5",))
    attacker.advertise()
    attacker.adverts["s5"] = attacker.outsider_advertisement("s5")
    views = {}
    for site in members:
        others = data.draw(st.sets(st.sampled_from([*members, "s5"])), label=f"view of {site}")
        views[site] = tuple(sorted({site, *others}))
    attacker.share(views)
    for site, view in views.items():
        assert ("s5" in view) == isinstance(attacker.refusals.get(site), OutsideBlockGroupError)
    sent_to = {
        site: {v for v, answer in attacker.shares.items() if any(share.peer == site for share in answer.shares)}
        for site in attacker.shares
    }
    attacker.mask({site: tuple(sorted({site} | (sent_to[site] & set(views[site])))) for site in attacker.shares})
    sets = {}
    for site, answer in attacker.masked.items():
        if answer.blocks:
            group = attacker.fed.sites[site]._masked.mask_groups[BLOCK]
            assert set(group) <= set(members)
            others = data.draw(st.sets(st.sampled_from(group)), label=f"set for {site}")
            sets[site] = tuple(sorted({site, *others}))
    attacker.check(sets)
    by_set: dict[tuple[str, ...], int] = {}
    for site in attacker.signatures:
        assert site in members
        by_set[attacker.asked[site]] = by_set.get(attacker.asked[site], 0) + 1
    assert sum(count >= threshold for count in by_set.values()) <= 1
