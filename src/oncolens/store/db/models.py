"""Tables (SQLModel). The schema is made only by the Alembic migrations next to this file."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    true,
)
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Role(StrEnum):
    admin = "admin"
    clinician = "clinician"
    viewer = "viewer"


class CaseStatus(StrEnum):
    pending = "pending_review"
    reviewed = "reviewed"
    confirmed = "confirmed"


class ReferenceStandard(StrEnum):
    """How a case's reference class (the diagnosis the model is measured against) was established."""

    histopathology = "histopathology"
    cytology = "cytology"
    clinical_follow_up = "clinical_follow_up"
    expert_consensus = "expert_consensus"


def _when(index: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=False, index=index)


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(sa_column=Column(String(255), nullable=False, unique=True))
    full_name: str = Field(default="", max_length=255)
    hashed_password: str = Field(max_length=255)
    role: str = Field(default=Role.clinician.value, max_length=16)
    is_active: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_when())
    # Every access token carries the version it was issued under; bumping it (password change or
    # reset, deactivation) makes all of the user's earlier tokens invalid at once.
    token_version: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    # When the user proved they read this address (an invitation accepted, a reset or sign-up code used).
    email_verified_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    # False for a self-signed-up account until an admin approves it: it cannot log in before.
    approved: bool = Field(default=True, sa_column=Column(Boolean, nullable=False, server_default=true()))
    # The TOTP secret, encrypted (oncolens.accounts.totp); set but not enabled while enrolment awaits its first code.
    totp_secret: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    totp_enabled_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    totp_last_step: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))

    @property
    def has_password(self) -> bool:
        """False for an invited account whose invitation is not accepted yet."""
        return bool(self.hashed_password)

    @property
    def two_factor(self) -> bool:
        return self.totp_enabled_at is not None


class TokenPurpose(StrEnum):
    invite = "invite"
    reset = "reset"
    signup = "signup"


class AccountToken(SQLModel, table=True):
    """A single-use, expiring secret sent by e-mail (invitation link, reset link, sign-up code);
    only its keyed hash is stored."""

    __tablename__ = "account_tokens"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(
        sa_column=Column(Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    purpose: str = Field(sa_column=Column(String(16), nullable=False))
    token_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_when())
    expires_at: datetime = Field(sa_column=_when())
    used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    # A sign-up code's pending credentials (JSON: password hash, name), set on the account only when
    # the code is used, so that a second sign-up for the same pending address cannot replace them.
    payload: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class MailQueue(SQLModel, table=True):
    """One e-mail waiting to be sent by the server's drainer (``services.mailqueue``)."""

    __tablename__ = "mail_queue"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=_when())
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=_when(index=True))
    # Set while one drainer sends it; a drainer that died leaves it to another once this passes.
    claimed_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    recipient: str = Field(sa_column=Column(String(255), nullable=False))
    letter: str = Field(sa_column=Column(Text, nullable=False))  # JSON of mail.Letter
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))


class RecoveryCode(SQLModel, table=True):
    """One of a user's single-use second-factor recovery codes (keyed hash only)."""

    __tablename__ = "recovery_codes"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(
        sa_column=Column(Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    code_hash: str = Field(sa_column=Column(String(64), nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class RequestThrottle(SQLModel, table=True):
    """How many e-mails were asked for under a key (an address, a client) in the current hour window."""

    __tablename__ = "request_throttle"

    key: str = Field(sa_column=Column(String(300), primary_key=True))
    window_start: datetime = Field(sa_column=_when())
    count: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))


class RevokedToken(SQLModel, table=True):
    """One access token ended before its expiry (a logout); kept until it would have expired."""

    __tablename__ = "revoked_tokens"

    jti: str = Field(sa_column=Column(String(32), primary_key=True))
    expires_at: datetime = Field(sa_column=_when(index=True))


class LoginThrottle(SQLModel, table=True):
    """Failed-login counts per account name, kept whether or not the account exists."""

    __tablename__ = "login_throttle"

    email: str = Field(sa_column=Column(String(255), primary_key=True))
    failures: int = Field(default=0)
    locked_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class Case(SQLModel, table=True):
    __tablename__ = "cases"
    __table_args__ = (
        Index("ix_cases_owner_created", "owner_id", "created_at"),
        Index("ix_cases_model_created", "model_id", "created_at"),
        Index("ix_cases_created_id", "created_at", "id"),
    )

    id: str = Field(default_factory=new_id, sa_column=Column(String(32), primary_key=True))
    owner_id: int = Field(sa_column=Column(Integer, ForeignKey("users.id"), nullable=False, index=True))
    model_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    model_version: str = Field(max_length=32)
    patient_ref: str = Field(default="", sa_column=Column(String(128), nullable=False, index=True))
    patient_name: str = Field(default="", max_length=255)
    patient_age: int | None = Field(default=None)
    patient_sex: str = Field(default="", max_length=16)
    patient_email: str = Field(default="", max_length=255)
    clinical_notes: str = Field(default="", sa_column=Column(Text, nullable=False))
    status: str = Field(default=CaseStatus.pending.value, sa_column=Column(String(16), nullable=False, index=True))
    top_class: str = Field(max_length=64)
    p_malignant: float
    risk_level: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    recommendation: str = Field(sa_column=Column(Text, nullable=False))
    aggregation_rule: str = Field(max_length=32)
    result_json: str = Field(sa_column=Column(Text, nullable=False))
    confirmed_diagnosis: str = Field(default="", max_length=255)
    review_notes: str = Field(default="", sa_column=Column(Text, nullable=False))
    reviewed_by: int | None = Field(default=None, sa_column=Column(Integer, ForeignKey("users.id"), nullable=True))
    reviewed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    # The reference standard of the review (migration 0005): one of the model's class ids, how it was
    # established (ReferenceStandard) and when; what `cases export-dataset` and monitoring measure against.
    reference_class: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    reference_standard: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    reference_date: date | None = Field(default=None, sa_column=Column(Date, nullable=True))
    # A shadow version's answer to the same images: stored for monitoring, never shown to clinicians.
    shadow_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    shadow_result_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The DICOM study the listener made the case from: such cases are the department's, seen by every clinician.
    dicom_study_uid: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_when(index=True))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_when())


class CaseImage(SQLModel, table=True):
    __tablename__ = "case_images"

    id: str = Field(default_factory=new_id, sa_column=Column(String(32), primary_key=True))
    case_id: str = Field(
        sa_column=Column(String(32), ForeignKey("cases.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    position: int
    original_filename: str = Field(default="", max_length=255)
    stored_name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    media_type: str = Field(max_length=32)
    width: int
    height: int
    size_bytes: int
    sha256: str = Field(max_length=64)
    result_json: str = Field(sa_column=Column(Text, nullable=False))


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"
    # Each filter of the audit log with the page order behind it: a filtered page reads 50 index entries.
    __table_args__ = (
        Index("ix_audit_events_user_id_id", "user_id", "id"),
        Index("ix_audit_events_action_id", "action", "id"),
        Index("ix_audit_events_case_id_id", "case_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=_when(index=True))
    user_id: int | None = Field(default=None)
    actor: str = Field(default="", max_length=255)
    action: str = Field(sa_column=Column(String(32), nullable=False))
    case_id: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
    client: str = Field(default="", max_length=64)


class PackageBlob(SQLModel, table=True):
    """One file of an installed model package, by content (a site version shares its parent's model.onnx)."""

    __tablename__ = "package_blobs"

    sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ModelVersion(SQLModel, table=True):
    """A model package installed into the database, where every replica finds it (``oncolens models install``)."""

    __tablename__ = "model_versions"
    __table_args__ = (Index("ux_model_versions_model_version", "model_id", "version", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    version: str = Field(sa_column=Column(String(64), nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False))  # of model.onnx, as the card says
    card_json: str = Field(sa_column=Column(Text, nullable=False))
    files_json: str = Field(sa_column=Column(Text, nullable=False))  # {relative path: blob sha256}
    # The card's acceptance gate: True passed, False failed (it cannot be promoted), None: no gate (not a site version).
    gate_passed: bool | None = Field(default=None, sa_column=Column(Boolean, nullable=True))
    installed_by: str = Field(default="", sa_column=Column(String(255), nullable=False, server_default=""))
    installed_at: datetime = Field(default_factory=utcnow, sa_column=_when())


class ModelDeployment(SQLModel, table=True):
    """One step of a model's serving history: which version serves and which runs in shadow from ``at``.

    The newest row of a model is its state; ``rollback`` goes back one ``promote`` (or to the shipped version).
    """

    __tablename__ = "model_deployments"

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    action: str = Field(sa_column=Column(String(16), nullable=False))  # promote, rollback, shadow, unshadow
    live_version: str = Field(sa_column=Column(String(64), nullable=False))
    shadow_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    at: datetime = Field(default_factory=utcnow, sa_column=_when())
    by: str = Field(default="", sa_column=Column(String(255), nullable=False, server_default=""))
    why: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))


class CaseCount(SQLModel, table=True):
    """How many cases were made on a day (UTC) by a model with a risk level and a review status: kept up
    to date in the transaction of every case write (``store.stats``), so the dashboard reads a few
    hundred rows instead of counting every case. ``oncolens db refresh-stats`` rebuilds it from the cases."""

    __tablename__ = "case_counts"

    day: date = Field(sa_column=Column(Date, primary_key=True))
    model_id: str = Field(sa_column=Column(String(64), primary_key=True))
    risk_level: str = Field(sa_column=Column(String(16), primary_key=True))
    status: str = Field(sa_column=Column(String(16), primary_key=True))
    n: int = Field(sa_column=Column(Integer, nullable=False))


class MonitorCount(SQLModel, table=True):
    """The monitoring page's figures kept, not recomputed: cases of a model made in a span of days (UTC),
    by P(malignant) in 1/100 bins, whether the model called them malignant, whether they were
    indeterminate and their reference class ('' before a review gives one), with their images, out-of-
    domain and quality-warned images and the sum of their P. Each case counts three times: in its day
    (``span`` d), its week (w, from Monday) and its month (m), so that a page of months or weeks reads a
    row per month or week and only the partial ones at its edges from days. Kept in the transaction of
    every create, review and delete (``store.stats``); ``oncolens db refresh-stats`` rebuilds it."""

    __tablename__ = "monitor_counts"

    model_id: str = Field(sa_column=Column(String(64), primary_key=True))  # first: a page reads one model's
    span: str = Field(sa_column=Column(String(1), primary_key=True))
    day: date = Field(sa_column=Column(Date, primary_key=True))  # the span's first day
    p_bin: int = Field(sa_column=Column(SmallInteger, primary_key=True))
    called: bool = Field(sa_column=Column(Boolean, primary_key=True))
    indeterminate: bool = Field(sa_column=Column(Boolean, primary_key=True))
    reference_class: str = Field(sa_column=Column(String(64), primary_key=True))
    n: int = Field(sa_column=Column(Integer, nullable=False))
    images: int = Field(sa_column=Column(Integer, nullable=False))
    images_out: int = Field(sa_column=Column(Integer, nullable=False))
    images_warned: int = Field(sa_column=Column(Integer, nullable=False))
    p_sum: float = Field(sa_column=Column(Float, nullable=False))


class AuditCount(SQLModel, table=True):
    """How many audit events of an action a user (0: none) wrote on a day (UTC): kept with every audit
    event written (``store.stats``), so the audit log's totals read a few rows instead of counting millions."""

    __tablename__ = "audit_counts"

    day: date = Field(sa_column=Column(Date, primary_key=True))
    action: str = Field(sa_column=Column(String(32), primary_key=True))
    user_id: int = Field(sa_column=Column(Integer, primary_key=True))
    n: int = Field(sa_column=Column(Integer, nullable=False))


class DicomStudy(SQLModel, table=True):
    """A study the DICOM listener received: its instances wait in the data folder's ``dicom/inbox``
    until nothing arrived for ``ONCOLENS_DICOM_STABLE_SECONDS``; then it is routed to a model and
    analysed once into a case (``state`` analysed), or kept and listed (unrouted, failed)."""

    __tablename__ = "dicom_studies"

    study_uid: str = Field(sa_column=Column(String(64), primary_key=True))
    calling_ae: str = Field(default="", sa_column=Column(String(16), nullable=False))
    state: str = Field(default="receiving", sa_column=Column(String(16), nullable=False, index=True))
    instances: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    first_received_at: datetime = Field(default_factory=utcnow, sa_column=_when())
    last_received_at: datetime = Field(default_factory=utcnow, sa_column=_when())
    model_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    case_id: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    detail: str = Field(default="", sa_column=Column(Text, nullable=False))
