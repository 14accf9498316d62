"""What the users, cases and audit routes accept and return (Create / Public / Update variants)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, EmailStr, Field

from oncolens.services.accounts import account_state
from oncolens.services.inputs import CaseReview, PartialUpdate
from oncolens.store.db.models import AuditEvent, Case, User
from oncolens.store.views import CasePublic, StatusName, UTCDateTime
from oncolens.zoo.card import RiskLevel

__all__ = ["CasePublic", "CaseUpdate", "StatusName", "UTCDateTime"]

RoleName = Literal["admin", "clinician", "viewer"]


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")


AccountState = Literal["active", "invited", "unverified", "awaiting approval", "deactivated"]


class UserPublic(BaseModel):
    id: int
    email: str
    full_name: str
    role: RoleName
    is_active: bool
    created_at: UTCDateTime
    state: AccountState = Field(
        description="invited: the invitation is not accepted yet; unverified / awaiting "
        "approval: a self-sign-up before its e-mail code / an admin's approval."
    )
    email_verified: bool = Field(description="The user proved they read this address (invitation, reset or code).")
    two_factor: bool = Field(description="Sign-in needs a TOTP code (or a recovery code) after the password.")

    @classmethod
    def of(cls, user: User) -> UserPublic:
        return cls(
            id=user.id or 0,
            email=user.email,
            full_name=user.full_name,
            role=user.role,
            is_active=user.is_active,
            created_at=user.created_at,
            state=account_state(user),
            email_verified=user.email_verified_at is not None,
            two_factor=user.two_factor,
        )


class Message(BaseModel):
    detail: str


class Invitation(BaseModel):
    email: EmailStr
    role: RoleName = "clinician"
    full_name: str = Field("", max_length=255)


class InvitationAccept(BaseModel):
    token: str = Field(min_length=1, max_length=128, description="The token from the invitation link.")
    password: str = Field(min_length=10, max_length=128)
    full_name: str | None = Field(None, max_length=255)


class ResetRequest(BaseModel):
    email: EmailStr


class ResetConfirm(BaseModel):
    token: str = Field(min_length=1, max_length=128, description="The token from the reset link.")
    password: str = Field(min_length=10, max_length=128)


class SignUp(BaseModel):
    email: EmailStr
    full_name: str = Field("", max_length=255)
    password: str = Field(min_length=10, max_length=128)


class SignUpVerify(BaseModel):
    email: EmailStr
    code: str = Field(min_length=1, max_length=32, description="The 6-digit code from the e-mail.")


class Code(BaseModel):
    code: str = Field(min_length=1, max_length=32, description="A 6-digit code from the authenticator app.")


class DisableTwoFactor(BaseModel):
    password: str = Field(min_length=1, max_length=128, description="Your current password.")
    code: str = Field(min_length=1, max_length=32, description="A code from the app, or a recovery code.")


class TwoFactorStatus(BaseModel):
    enabled: bool
    pending: bool = Field(description="An enrolment was started and awaits its first code.")
    required: bool = Field(description="This server requires a second factor for every user.")
    recovery_codes_left: int


class TwoFactorSetup(BaseModel):
    secret: str = Field(description="Base32 secret, to type into the app if the QR code cannot be scanned.")
    otpauth_uri: str
    qr_svg: str = Field(description="The QR code of otpauth_uri as an SVG document.")


class RecoveryCodes(BaseModel):
    recovery_codes: list[str] = Field(description="Single-use codes for when the phone is lost; shown only now.")


class UserCreate(BaseModel):
    email: EmailStr
    password: str = Field(min_length=10, max_length=128)
    full_name: str = Field("", max_length=255)
    role: RoleName = "clinician"


class UserUpdate(PartialUpdate):
    """Admin changes to an account; every field optional."""

    full_name: str | None = Field(None, max_length=255)
    role: RoleName | None = None
    is_active: bool | None = None
    password: str | None = Field(None, min_length=10, max_length=128)


class UserUpdateMe(PartialUpdate):
    nullable = frozenset({"current_password"})

    full_name: str | None = Field(None, max_length=255)
    password: str | None = Field(None, min_length=10, max_length=128)
    current_password: str | None = Field(None, description="Needed to change the password.")


class CaseSummary(BaseModel):
    id: str
    owner_id: int
    model_id: str
    created_at: UTCDateTime
    patient_ref: str
    top_class: str
    p_malignant: float
    risk_level: RiskLevel
    status: StatusName

    @classmethod
    def of(cls, case: Case) -> CaseSummary:
        return cls.model_validate(case, from_attributes=True)


NEXT_CURSOR = (
    "Pass it as `cursor` for the next page (keyset paging: as fast deep down as on top, and rows added "
    "meanwhile neither repeat nor hide older ones); null on the last page."
)
TOTAL_SOURCE = (
    "Where `total` comes from: `maintained`, the counts the server keeps with every write (exact, and read "
    "in a few rows however many there are), or `counted` over the matching rows."
)
TotalSource = Literal["maintained", "counted"]


class CasesPage(BaseModel):
    items: list[CaseSummary]
    total: int = Field(description="Cases matching the filters, over all pages.")
    total_source: TotalSource = Field(description=TOTAL_SOURCE)
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description=NEXT_CURSOR)


# The clinician review: the API takes the services' own input model.
CaseUpdate = CaseReview


class AuditEventPublic(BaseModel):
    id: int
    at: UTCDateTime
    user_id: int | None
    actor: str
    action: str
    case_id: str | None
    detail: str
    client: str

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventPublic:
        return cls.model_validate(event, from_attributes=True)


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    total: int = Field(description="Events matching the filters, over all pages.")
    total_source: TotalSource = Field(description=TOTAL_SOURCE)
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description=NEXT_CURSOR)
