"""Settings from ``ONCOLENS_*`` environment variables (pydantic-settings), one class for the app."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(user_data_dir("oncolens", appauthor=False))


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Runtime configuration; every field can be set as ``ONCOLENS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ONCOLENS_", env_file=None, extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="Database and stored files.")
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest accepted upload in bytes.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest accepted image in pixels (W x H).")
    max_images_per_request: int = Field(32, gt=0, description="Most images in one predict request.")
    max_request_pixels: int = Field(
        200_000_000, gt=0, description="Most pixels (W x H, summed over its images) one request may hold."
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Most image bytes (summed over its images) one request may upload."
    )
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per model (0 = all cores).")
    spinning: bool = Field(
        False,
        description="ONNX Runtime threads spin while waiting for work: lower latency for one image at a time, "
        "more CPU burnt under load (see README, Performance).",
    )
    precision: Literal["int8", "fp32"] = Field(
        "int8",
        description="Which model file serves: int8 (the quantized copy, where it passed its accuracy gate) or fp32.",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Worker threads that decode and prepare uploaded images at once (0 = the cores less one, "
        "at least one, leaving a core to the event loop); more only adds contention (see README, Performance).",
    )
    batch_max: int = Field(
        8,
        gt=0,
        description="Most backbone passes (images x the model's test-time views) in one model call: "
        "8 images of a one-view model, 2 of a model with four views (see README, Performance).",
    )
    batch_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits to fill, in milliseconds.")
    release_memory_idle_s: float = Field(
        10.0,
        ge=0,
        description="Seconds without a model run after which the server gives the working memory that "
        "batches of several images grew back to the system (0 = keep it; see README, Performance).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origins, comma separated."
    )
    extra_model_dir: Path | None = Field(None, description="A folder of extra model packages.")
    one_network: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models (comma separated ids, or 'all') served by their one-network build instead of the "
        "ensemble their card names: for a machine too slow for the ensemble (each ensemble's card gives both costs).",
    )
    preload_models: bool = Field(True, description="Load every model at start-up.")
    model_poll_s: float = Field(
        2.0,
        gt=0,
        le=5,
        description="How often each server process checks the database for a promotion, rollback or shadow "
        "change (seconds, at most 5): every replica serves such a step within this time, without a restart.",
    )
    drift_psi: float = Field(
        0.25,
        gt=0,
        description="Monitoring: a period's P(malignant) distribution drifts when its population stability index "
        "against the card's test distribution is above this (0.25 is the usual 'large shift').",
    )
    drift_ks_p: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Monitoring: ... or when the Kolmogorov-Smirnov test of it against the card's test "
        "distribution gives a p-value below this.",
    )
    drift_min_cases: int = Field(
        50, ge=1, description="Monitoring: fewer cases than this in a period raise no drift flag (too few to tell)."
    )
    monitor_min_reviewed: int = Field(
        30,
        ge=1,
        description="Monitoring: fewer cases with a reference class than this raise no performance flag.",
    )
    monitor_sensitivity_drop: float = Field(
        0.10,
        gt=0,
        lt=1,
        description="Monitoring: the performance flag is raised when the sensitivity on reviewed cases falls more "
        "than this below the card's test sensitivity, or their AUROC more than this below the card's.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default a SQLite file in the data directory. PostgreSQL: postgresql+psycopg://...",
    )
    secret_key: str | None = Field(
        None,
        description="JWT signing key; default a random key kept in <data_dir>/secret.key (SQLite only: "
        "a server on another database must be given one, the same on every replica).",
    )
    image_store: str = Field(
        "file",
        description="Where case images are kept: 'file' (the data folder's images/) or s3://BUCKET/PREFIX "
        "(S3-compatible object storage, shared by replicas).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Address of the S3-compatible service (e.g. http://127.0.0.1:8333); default AWS."
    )
    s3_access_key_id: str | None = Field(None, description="S3 access key id (none: boto3's usual sources).")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_region: str = Field("us-east-1", description="S3 region name.")
    s3_timeout_s: float = Field(
        3.0,
        gt=0,
        description="Seconds to wait for the S3 service to connect or answer; one retry, so a store that "
        "hangs costs a request at most about twice this before it gets 503.",
    )
    min_free_mb: int = Field(
        200,
        ge=0,
        description="Free space (MB) the data folder must keep: below it new cases are refused (507) while "
        "reads, logins and reviews go on; 0 turns the check off.",
    )
    access_token_minutes: int = Field(60, gt=0, description="Lifetime of an access token.")
    login_max_failures: int = Field(5, gt=0, description="Failed logins before an account name is locked.")
    login_lock_minutes: int = Field(15, gt=0, description="How long a locked account name stays locked.")
    require_auth_for_predict: bool = Field(
        False, description="Require a login (Bearer token or web session) on the predict and compat routes."
    )
    compat_upload_max_files: int = Field(200, gt=0, description="Most images the skin 7-class upload store keeps.")
    compat_upload_max_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Most bytes the skin 7-class upload store keeps (oldest go first)."
    )
    compat_upload_keep_minutes: int = Field(
        60, gt=0, description="How long an image uploaded to the skin 7-class app is kept."
    )
    orphan_sweep_minutes: float = Field(
        10.0, gt=0, description="How often stored files that no case refers to are looked for and removed."
    )

    smtp_host: str | None = Field(
        None, description="SMTP server for e-mail (invitations, password reset, sign-up codes)."
    )
    smtp_port: int | None = Field(
        None, gt=0, lt=65536, description="SMTP port; default 465 with SMTP_SSL, 587 with SMTP_STARTTLS, else 25."
    )
    smtp_user: str | None = Field(None, description="SMTP login name (none: send without logging in).")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_starttls: bool = Field(False, description="Upgrade the SMTP connection with STARTTLS.")
    smtp_ssl: bool = Field(False, description="Connect to the SMTP server over TLS from the start (SMTPS).")
    smtp_from: str | None = Field(
        None, description="Sender address of OncoLens e-mail, e.g. 'OncoLens <noreply@clinic.org>'."
    )
    smtp_timeout_s: float = Field(
        10.0, gt=0, description="Seconds to wait for the SMTP server (connecting, then each answer)."
    )
    public_url: str | None = Field(
        None,
        description="Address users reach this server at (e.g. https://oncolens.clinic.org): the one origin of "
        "links in e-mail and of absolute URLs (FHIR). Without it the e-mail features answer 409 naming this "
        "setting and FHIR gives relative URLs: links are never built from the address a request names.",
    )
    mail_poll_s: float = Field(
        2.0,
        gt=0,
        le=10,
        description="How often the server sends the e-mail queued by requests (seconds, at most 10); the "
        "sending never happens inside a request.",
    )
    self_signup: bool = Field(
        False, description="Let anyone sign up with an e-mail code; an admin must approve the account before use."
    )
    require_two_factor: bool = Field(
        False, description="Every user must enrol a second factor (TOTP) before using any other page or route."
    )
    invite_hours: int = Field(72, gt=0, description="How long an invitation link stays valid.")
    reset_minutes: int = Field(30, gt=0, description="How long a password-reset link stays valid.")
    signup_code_minutes: int = Field(15, gt=0, description="How long a sign-up code sent by e-mail stays valid.")
    mail_max_per_hour: int = Field(
        5, gt=0, description="Most reset or sign-up e-mails per address per hour (and 4x that per client address)."
    )

    log_file: Path | None = Field(
        None, description="Also write the server log to this file (reopened after logrotate)."
    )
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")

    web_enabled: bool = Field(True, description="Serve the web app (login, analyze, cases, models, dashboard).")
    clinic_name: str = Field("OncoLens", description="Clinic or site name printed at the top of PDF reports.")
    compat_enabled: bool = Field(True, description="Serve the five replaced apps' routes (see README, Migration).")
    compat_root: Literal["skin9", "skin7", "cervical", "thyroid", "none"] = Field(
        "skin9", description="Which app's routes the contested root paths (/predict, /health) imitate."
    )
    compat_models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Override the model behind an app, e.g. 'skin9=skin-isic9,oral=oral-photo'."
    )

    # The DICOM node (`oncolens dicom listen`): a Storage SCP beside the server, sharing its database.
    dicom_ae_title: str = Field("ONCOLENS", min_length=1, max_length=16, description="The listener's AE title.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="The listener's TCP port.")
    dicom_host: str = Field("0.0.0.0", description="The address the listener binds.")
    dicom_allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate, comma-separated, each optionally AE@host; "
        "others are rejected at association (none set: every association is refused).",
    )
    dicom_stable_seconds: float = Field(
        10.0, gt=0, description="A study is complete when nothing arrived for it this many seconds."
    )
    dicom_routes: Path | None = Field(
        None, description="A TOML file of [[route]] tables: modality, body_part, study_description, calling_ae, model."
    )
    dicom_destinations: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="C-STORE targets for the results, comma-separated AE@host:port."
    )
    dicomweb_url: str | None = Field(None, description="A DICOMweb base URL the results are also sent to (STOW-RS).")
    dicom_tls_cert: Path | None = Field(
        None, description="The listener's TLS certificate (PEM): associations over TLS."
    )
    dicom_tls_key: Path | None = Field(None, description="The private key of ONCOLENS_DICOM_TLS_CERT (PEM).")
    dicom_tls_ca: Path | None = Field(
        None, description="CA certificates (PEM) that callers' certificates must chain to: mutual TLS."
    )
    dicom_viewer_url: str | None = Field(
        None,
        description="The PACS viewer's address of a study, with {study_uid} (e.g. an OHIF viewer's "
        "https://pacs.example/viewer?StudyInstanceUIDs={study_uid}): the case page links it.",
    )
    dicom_owner: str | None = Field(
        None, description="E-mail of the account that owns the cases the listener makes (default: the first admin)."
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'oncolens.db'}"

    @property
    def resolved_decode_threads(self) -> int:
        """How many uploads are decoded at once: ``decode_threads``, or one fewer than the usable cores
        (at least one), leaving a core to the event loop."""
        if self.decode_threads:
            return self.decode_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores - 1)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the most image bytes a request may carry, as base64 (4/3), plus 64 KiB
        for the form fields or JSON around them."""
        images = min(self.max_request_bytes, self.max_image_bytes * self.max_images_per_request)
        return -(-images * 4 // 3) + 64 * 1024

    @property
    def on_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def mail_configured(self) -> bool:
        return bool(self.smtp_host)

    @model_validator(mode="after")
    def _one_tls_mode(self) -> Settings:
        if self.smtp_ssl and self.smtp_starttls:
            raise ValueError("set ONCOLENS_SMTP_SSL or ONCOLENS_SMTP_STARTTLS, not both")
        if self.image_store != "file":
            bucket = self.image_store.removeprefix("s3://").partition("/")[0]
            if not self.image_store.startswith("s3://") or not bucket:
                raise ValueError(f"ONCOLENS_IMAGE_STORE must be 'file' or s3://BUCKET/PREFIX, got {self.image_store!r}")
        if self.s3_endpoint_url and not self.s3_endpoint_url.startswith(("http://", "https://")):
            raise ValueError(
                f"ONCOLENS_S3_ENDPOINT_URL must start with http:// or https://, got {self.s3_endpoint_url!r}"
            )
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError(f"ONCOLENS_PUBLIC_URL must start with http:// or https://, got {self.public_url!r}")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        """``postgres://`` and ``postgresql://`` (the forms hosting services hand out) mean PostgreSQL through
        psycopg 3, the driver the ``[postgres]`` extra installs."""
        if value is None:
            return None
        value = value.strip()
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @model_validator(mode="after")
    def _sqlite_folder(self) -> Settings:
        """An explicit SQLite file must be in a folder that exists, or in the data folder (made at start-up)."""
        url = self.database_url or ""
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///").split("?", 1)[0]
            if path and path != ":memory:" and not path.startswith("file:"):
                folder = Path(path).parent
                if not folder.is_dir() and folder.resolve() != Path(self.data_dir).resolve():
                    raise ValueError(
                        f"ONCOLENS_DATABASE_URL: the folder {folder} of the SQLite database does not exist: "
                        "create it, or fix the path"
                    )
        return self

    @field_validator("cors_origins", "one_network", "dicom_allowed_aes", "dicom_destinations", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("compat_models", mode="before")
    @classmethod
    def _app_equals_model(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = {}
        for part in value.split(","):
            if not part.strip():
                continue
            app, sep, model = str(part).partition("=")
            if not sep or not app.strip() or not model.strip():
                raise ValueError(f"expected app=model pairs separated by commas, got {part!r}")
            pairs[app.strip()] = model.strip()
        return pairs


@lru_cache
def get_settings() -> Settings:
    return Settings()
