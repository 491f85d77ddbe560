"""Errors of the secure-aggregation protocol: a peer sent something the protocol forbids.

Every class here derives from :class:`blossom_secure.errors.ProtocolError` (the peer is at
fault). A failed signature check or a failed decryption is always the single opaque
:class:`blossom_secure.errors.AuthenticationError`, never one of these, so that no error
can be used as an oracle for which check failed.
"""

from __future__ import annotations

from blossom_secure.errors import AuthenticationError, ProtocolError

__all__ = [
    "AllZeroSharedSecretError",
    "AuthenticationError",
    "BothSharesRequestedError",
    "ConsistencyCheckError",
    "DuplicatePublicKeyError",
    "InconsistentMessageError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "OutsideBlockGroupError",
    "ProtocolError",
    "ReplayedMessageError",
    "StageOrderError",
    "UnknownFieldError",
    "UnknownSenderError",
    "UnsupportedVersionError",
    "WrongFederationError",
    "WrongRecipientError",
    "WrongRoundError",
]


class MalformedMessageError(ProtocolError):
    """The bytes are not a canonical encoding of a message of the expected type."""


class MessageTooLargeError(MalformedMessageError):
    """The message is longer than ``SecAggParams.max_message_bytes`` (checked before parsing)."""


class UnsupportedVersionError(MalformedMessageError):
    """The message names a wire-format version this implementation does not speak."""


class UnknownFieldError(MalformedMessageError):
    """The message carries a field tag that its type does not define."""


class WrongFederationError(ProtocolError):
    """The message belongs to another federation."""


class WrongRoundError(ProtocolError):
    """The message belongs to another round (for example, replayed from an earlier one)."""


class WrongRecipientError(ProtocolError):
    """A coordinator message addressed to another site."""


class StageOrderError(ProtocolError):
    """A message for a stage that is not the current one (too early, or after it closed)."""


class ReplayedMessageError(ProtocolError):
    """A second message for a stage from the same sender, or a duplicate inside a message."""


class UnknownSenderError(ProtocolError):
    """The sender is not in the federation roster, or not a participant of this stage."""


class DuplicatePublicKeyError(ProtocolError):
    """Two advertised public keys are equal (across sites, or a site's own keys)."""


class AllZeroSharedSecretError(ProtocolError):
    """An X25519 agreement came out all zero: a peer advertised a low-order point."""


class BothSharesRequestedError(ProtocolError):
    """The coordinator asked for both the self-mask share and the mask-key share of one peer."""


class ConsistencyCheckError(ProtocolError):
    """The consistency check failed: an unmask request without ``t_b`` signatures of
    distinct group members over the survivor set this site signed, or a survivor/dropped
    split that contradicts that set (Bonawitz et al. 2017, section 4, ConsistencyCheck).
    An invalid signature is the opaque ``AuthenticationError`` instead."""


class InconsistentMessageError(ProtocolError):
    """The message is well formed but contradicts the protocol state (missing or
    unexpected shares, blocks, recipients or survivors)."""


class OutsideBlockGroupError(InconsistentMessageError):
    """A site outside a block's public group ``P_b`` (the federation file's
    ``[aggregation.groups]``) appears where only members may: an advertisement of the
    block, a block group, a survivor set, or a consistency signer. Only members of
    ``P_b`` can sign for block ``b``, which is what lets ``2 t_b > |P_b|`` stand in for
    ``2 t_b > max_sites``."""
