"""Secure aggregation of shared blocks (Bonawitz et al. 2017, extended to block groups).

A pure core: no torch, no network, no files. Sites and the coordinator are explicit stage
machines over typed messages with a canonical, versioned, size-limited encoding;
:func:`run_secure_aggregation` runs a whole round in one process. See ``docs/protocol.md``
and ``docs/threat-model.md``.
"""

from blossom_secure.secagg.coordinator import BlockResult, CoordinatorStageMachine
from blossom_secure.secagg.driver import (
    DROP_POINTS,
    EgressHook,
    SecAggResult,
    run_secure_aggregation,
)
from blossom_secure.secagg.errors import (
    AllZeroSharedSecretError,
    BothSharesRequestedError,
    ConsistencyCheckError,
    DuplicatePublicKeyError,
    InconsistentMessageError,
    MalformedMessageError,
    MessageTooLargeError,
    OutsideBlockGroupError,
    ReplayedMessageError,
    StageOrderError,
    UnknownFieldError,
    UnknownSenderError,
    UnsupportedVersionError,
    WrongFederationError,
    WrongRecipientError,
    WrongRoundError,
)
from blossom_secure.secagg.params import SecAggParams, SparseGraph
from blossom_secure.secagg.site import STAGE_NAMES, SiteContribution, SiteStageMachine
from blossom_secure.secagg.site_state import SiteStateError, StageAlreadyAnsweredError

__all__ = [
    "DROP_POINTS",
    "STAGE_NAMES",
    "AllZeroSharedSecretError",
    "BlockResult",
    "BothSharesRequestedError",
    "ConsistencyCheckError",
    "CoordinatorStageMachine",
    "DuplicatePublicKeyError",
    "EgressHook",
    "InconsistentMessageError",
    "MalformedMessageError",
    "MessageTooLargeError",
    "OutsideBlockGroupError",
    "ReplayedMessageError",
    "SecAggParams",
    "SparseGraph",
    "SecAggResult",
    "SiteContribution",
    "SiteStageMachine",
    "SiteStateError",
    "StageAlreadyAnsweredError",
    "StageOrderError",
    "UnknownFieldError",
    "UnknownSenderError",
    "UnsupportedVersionError",
    "WrongFederationError",
    "WrongRecipientError",
    "WrongRoundError",
    "run_secure_aggregation",
]
