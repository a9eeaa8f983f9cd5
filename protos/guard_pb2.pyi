from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IdentityRequest(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class SiteIdentity(_message.Message):
    __slots__ = ("site", "public_key", "signer", "challenge", "dictionary_hash", "signature")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site: str
    public_key: bytes
    signer: str
    challenge: bytes
    dictionary_hash: str
    signature: bytes
    def __init__(self, site: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signer: _Optional[str] = ..., challenge: _Optional[bytes] = ..., dictionary_hash: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Addressee(_message.Message):
    __slots__ = ("site", "signer")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    site: str
    signer: str
    def __init__(self, site: _Optional[str] = ..., signer: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteDescription(_message.Message):
    __slots__ = ("site", "dictionary_hash", "rho_limit", "rho_spent", "limits")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_HASH_FIELD_NUMBER: _ClassVar[int]
    RHO_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RHO_SPENT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    site: str
    dictionary_hash: str
    rho_limit: float
    rho_spent: float
    limits: PolicyLimits
    def __init__(self, site: _Optional[str] = ..., dictionary_hash: _Optional[str] = ..., rho_limit: _Optional[float] = ..., rho_spent: _Optional[float] = ..., limits: _Optional[_Union[PolicyLimits, _Mapping]] = ...) -> None: ...

class PolicyLimits(_message.Message):
    __slots__ = ("max_rho_per_plan", "max_marginals", "max_width", "max_cells", "max_plans_per_day")
    MAX_RHO_PER_PLAN_FIELD_NUMBER: _ClassVar[int]
    MAX_MARGINALS_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CELLS_FIELD_NUMBER: _ClassVar[int]
    MAX_PLANS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    max_rho_per_plan: float
    max_marginals: int
    max_width: int
    max_cells: int
    max_plans_per_day: int
    def __init__(self, max_rho_per_plan: _Optional[float] = ..., max_marginals: _Optional[int] = ..., max_width: _Optional[int] = ..., max_cells: _Optional[int] = ..., max_plans_per_day: _Optional[int] = ...) -> None: ...

class MarginalQuery(_message.Message):
    __slots__ = ("variables", "rho", "groups")
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedScalarFieldContainer[str]
    rho: float
    groups: _containers.RepeatedCompositeFieldContainer[CellGroups]
    def __init__(self, variables: _Optional[_Iterable[str]] = ..., rho: _Optional[float] = ..., groups: _Optional[_Iterable[_Union[CellGroups, _Mapping]]] = ...) -> None: ...

class CellGroups(_message.Message):
    __slots__ = ("cell_group",)
    CELL_GROUP_FIELD_NUMBER: _ClassVar[int]
    cell_group: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cell_group: _Optional[_Iterable[int]] = ...) -> None: ...

class QueryPlan(_message.Message):
    __slots__ = ("plan_id", "dictionary_hash", "coordinator", "marginals", "purpose", "expires_at", "secure", "evaluation", "addressees", "rho_to_follow")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_HASH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    MARGINALS_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ADDRESSEES_FIELD_NUMBER: _ClassVar[int]
    RHO_TO_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    dictionary_hash: str
    coordinator: str
    marginals: _containers.RepeatedCompositeFieldContainer[MarginalQuery]
    purpose: str
    expires_at: int
    secure: SecureAggregation
    evaluation: EvaluationQuery
    addressees: _containers.RepeatedCompositeFieldContainer[Addressee]
    rho_to_follow: float
    def __init__(self, plan_id: _Optional[str] = ..., dictionary_hash: _Optional[str] = ..., coordinator: _Optional[str] = ..., marginals: _Optional[_Iterable[_Union[MarginalQuery, _Mapping]]] = ..., purpose: _Optional[str] = ..., expires_at: _Optional[int] = ..., secure: _Optional[_Union[SecureAggregation, _Mapping]] = ..., evaluation: _Optional[_Union[EvaluationQuery, _Mapping]] = ..., addressees: _Optional[_Iterable[_Union[Addressee, _Mapping]]] = ..., rho_to_follow: _Optional[float] = ...) -> None: ...

class EvaluationQuery(_message.Message):
    __slots__ = ("records_sha256", "release_id", "manifest_sha256", "records", "tstr", "distance")
    RECORDS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TSTR_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    records_sha256: bytes
    release_id: str
    manifest_sha256: bytes
    records: int
    tstr: _containers.RepeatedCompositeFieldContainer[TstrQuery]
    distance: DistanceQuery
    def __init__(self, records_sha256: _Optional[bytes] = ..., release_id: _Optional[str] = ..., manifest_sha256: _Optional[bytes] = ..., records: _Optional[int] = ..., tstr: _Optional[_Iterable[_Union[TstrQuery, _Mapping]]] = ..., distance: _Optional[_Union[DistanceQuery, _Mapping]] = ...) -> None: ...

class TstrQuery(_message.Message):
    __slots__ = ("target", "positive", "bins", "rho")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    target: str
    positive: int
    bins: int
    rho: float
    def __init__(self, target: _Optional[str] = ..., positive: _Optional[int] = ..., bins: _Optional[int] = ..., rho: _Optional[float] = ...) -> None: ...

class DistanceQuery(_message.Message):
    __slots__ = ("rho_histogram", "rho_unique")
    RHO_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    RHO_UNIQUE_FIELD_NUMBER: _ClassVar[int]
    rho_histogram: float
    rho_unique: float
    def __init__(self, rho_histogram: _Optional[float] = ..., rho_unique: _Optional[float] = ...) -> None: ...

class EvaluationAnswer(_message.Message):
    __slots__ = ("tstr", "distance", "unique_copied")
    TSTR_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_COPIED_FIELD_NUMBER: _ClassVar[int]
    tstr: _containers.RepeatedCompositeFieldContainer[NoisyMarginal]
    distance: NoisyMarginal
    unique_copied: NoisyMarginal
    def __init__(self, tstr: _Optional[_Iterable[_Union[NoisyMarginal, _Mapping]]] = ..., distance: _Optional[_Union[NoisyMarginal, _Mapping]] = ..., unique_copied: _Optional[_Union[NoisyMarginal, _Mapping]] = ...) -> None: ...

class SecureAggregation(_message.Message):
    __slots__ = ("colluding", "min_parties", "dropouts")
    COLLUDING_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTIES_FIELD_NUMBER: _ClassVar[int]
    DROPOUTS_FIELD_NUMBER: _ClassVar[int]
    colluding: int
    min_parties: int
    dropouts: int
    def __init__(self, colluding: _Optional[int] = ..., min_parties: _Optional[int] = ..., dropouts: _Optional[int] = ...) -> None: ...

class KeyShare(_message.Message):
    __slots__ = ("site", "plan_sha256", "public_key", "signature", "signer", "peers", "min_parties")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTIES_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan_sha256: bytes
    public_key: bytes
    signature: bytes
    signer: str
    peers: _containers.RepeatedScalarFieldContainer[str]
    min_parties: int
    def __init__(self, site: _Optional[str] = ..., plan_sha256: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer: _Optional[str] = ..., peers: _Optional[_Iterable[str]] = ..., min_parties: _Optional[int] = ...) -> None: ...

class SignedPlan(_message.Message):
    __slots__ = ("plan", "signature", "signer", "roster", "records", "recovery")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    plan: bytes
    signature: bytes
    signer: str
    roster: _containers.RepeatedCompositeFieldContainer[KeyShare]
    records: bytes
    recovery: Recovery
    def __init__(self, plan: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer: _Optional[str] = ..., roster: _Optional[_Iterable[_Union[KeyShare, _Mapping]]] = ..., records: _Optional[bytes] = ..., recovery: _Optional[_Union[Recovery, _Mapping]] = ...) -> None: ...

class Recovery(_message.Message):
    __slots__ = ("statement", "signature", "shares", "confirmations")
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATIONS_FIELD_NUMBER: _ClassVar[int]
    statement: bytes
    signature: bytes
    shares: _containers.RepeatedCompositeFieldContainer[ForwardedShare]
    confirmations: _containers.RepeatedCompositeFieldContainer[Confirmation]
    def __init__(self, statement: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[ForwardedShare, _Mapping]]] = ..., confirmations: _Optional[_Iterable[_Union[Confirmation, _Mapping]]] = ...) -> None: ...

class Confirmation(_message.Message):
    __slots__ = ("site", "statement_sha256", "signature")
    SITE_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site: str
    statement_sha256: bytes
    signature: bytes
    def __init__(self, site: _Optional[str] = ..., statement_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RecoveryStatement(_message.Message):
    __slots__ = ("plan_sha256", "roster_sha256", "survivors", "dropped")
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROSTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    plan_sha256: bytes
    roster_sha256: bytes
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, plan_sha256: _Optional[bytes] = ..., roster_sha256: _Optional[bytes] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardedShare(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("recipient", "ciphertext")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    recipient: str
    ciphertext: bytes
    def __init__(self, recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class Reveal(_message.Message):
    __slots__ = ("site", "plan_sha256", "receipt", "receipt_signature", "shares", "seeds")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan_sha256: bytes
    receipt: bytes
    receipt_signature: bytes
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    seeds: _containers.RepeatedCompositeFieldContainer[RevealedSeed]
    def __init__(self, site: _Optional[str] = ..., plan_sha256: _Optional[bytes] = ..., receipt: _Optional[bytes] = ..., receipt_signature: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., seeds: _Optional[_Iterable[_Union[RevealedSeed, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class RevealedSeed(_message.Message):
    __slots__ = ("peer", "seed")
    PEER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    peer: str
    seed: bytes
    def __init__(self, peer: _Optional[str] = ..., seed: _Optional[bytes] = ...) -> None: ...

class SignedReveal(_message.Message):
    __slots__ = ("reveal", "signature", "signer")
    REVEAL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    reveal: bytes
    signature: bytes
    signer: str
    def __init__(self, reveal: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer: _Optional[str] = ...) -> None: ...

class RevealReceipt(_message.Message):
    __slots__ = ("site", "plan_id", "plan_sha256", "statement_sha256", "shares_of", "seeds_with", "revealed_at")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SHARES_OF_FIELD_NUMBER: _ClassVar[int]
    SEEDS_WITH_FIELD_NUMBER: _ClassVar[int]
    REVEALED_AT_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan_id: str
    plan_sha256: bytes
    statement_sha256: bytes
    shares_of: _containers.RepeatedScalarFieldContainer[str]
    seeds_with: _containers.RepeatedScalarFieldContainer[str]
    revealed_at: str
    def __init__(self, site: _Optional[str] = ..., plan_id: _Optional[str] = ..., plan_sha256: _Optional[bytes] = ..., statement_sha256: _Optional[bytes] = ..., shares_of: _Optional[_Iterable[str]] = ..., seeds_with: _Optional[_Iterable[str]] = ..., revealed_at: _Optional[str] = ...) -> None: ...

class NoisyMarginal(_message.Message):
    __slots__ = ("variables", "shape", "counts", "rho", "noise_scale", "masked")
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    variables: _containers.RepeatedScalarFieldContainer[str]
    shape: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    rho: float
    noise_scale: float
    masked: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, variables: _Optional[_Iterable[str]] = ..., shape: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., rho: _Optional[float] = ..., noise_scale: _Optional[float] = ..., masked: _Optional[_Iterable[int]] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("site", "plan_id", "dictionary_hash", "marginals", "receipt", "receipt_signature", "evaluation", "shares")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_HASH_FIELD_NUMBER: _ClassVar[int]
    MARGINALS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan_id: str
    dictionary_hash: str
    marginals: _containers.RepeatedCompositeFieldContainer[NoisyMarginal]
    receipt: bytes
    receipt_signature: bytes
    evaluation: EvaluationAnswer
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, site: _Optional[str] = ..., plan_id: _Optional[str] = ..., dictionary_hash: _Optional[str] = ..., marginals: _Optional[_Iterable[_Union[NoisyMarginal, _Mapping]]] = ..., receipt: _Optional[bytes] = ..., receipt_signature: _Optional[bytes] = ..., evaluation: _Optional[_Union[EvaluationAnswer, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class SignedSummary(_message.Message):
    __slots__ = ("summary", "signature", "signer")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    summary: bytes
    signature: bytes
    signer: str
    def __init__(self, summary: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer: _Optional[str] = ...) -> None: ...

class BudgetReceipt(_message.Message):
    __slots__ = ("site", "plan_id", "plan_sha256", "rho_debited", "rho_spent_total", "rho_limit", "debited_at", "ledger_seq", "dictionary_hash", "coordinator", "delta", "roster_sha256", "parties", "colluding", "rho_alone", "unit", "rows_per_patient", "bound", "dropouts")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    RHO_DEBITED_FIELD_NUMBER: _ClassVar[int]
    RHO_SPENT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RHO_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DEBITED_AT_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SEQ_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_HASH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ROSTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    PARTIES_FIELD_NUMBER: _ClassVar[int]
    COLLUDING_FIELD_NUMBER: _ClassVar[int]
    RHO_ALONE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_PATIENT_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    DROPOUTS_FIELD_NUMBER: _ClassVar[int]
    site: str
    plan_id: str
    plan_sha256: bytes
    rho_debited: float
    rho_spent_total: float
    rho_limit: float
    debited_at: str
    ledger_seq: int
    dictionary_hash: str
    coordinator: str
    delta: float
    roster_sha256: bytes
    parties: int
    colluding: int
    rho_alone: float
    unit: str
    rows_per_patient: int
    bound: str
    dropouts: int
    def __init__(self, site: _Optional[str] = ..., plan_id: _Optional[str] = ..., plan_sha256: _Optional[bytes] = ..., rho_debited: _Optional[float] = ..., rho_spent_total: _Optional[float] = ..., rho_limit: _Optional[float] = ..., debited_at: _Optional[str] = ..., ledger_seq: _Optional[int] = ..., dictionary_hash: _Optional[str] = ..., coordinator: _Optional[str] = ..., delta: _Optional[float] = ..., roster_sha256: _Optional[bytes] = ..., parties: _Optional[int] = ..., colluding: _Optional[int] = ..., rho_alone: _Optional[float] = ..., unit: _Optional[str] = ..., rows_per_patient: _Optional[int] = ..., bound: _Optional[str] = ..., dropouts: _Optional[int] = ...) -> None: ...
