"""Stored image files of cases, named by random ids (never the client's name), in one of two stores.

- ``FileStore``: a folder on the server's disk (the default, ``ONCOLENS_IMAGE_STORE=file``). Files
  are written durably (temp file, fsync, rename, fsync of the directory).
- ``S3Store``: S3-compatible object storage (``ONCOLENS_IMAGE_STORE=s3://BUCKET/PREFIX``), for
  replicas that share one store. A PUT is whole or absent, and answered once it is stored.

Either way a file is written before the rows that refer to it are committed, and removed again when
the commit fails; a crash in between leaves only unreferenced files, which ``sweep_orphans`` removes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, select

from oncolens.errors import OutOfSpace, Unavailable
from oncolens.store.db.models import CaseImage

if TYPE_CHECKING:
    from oncolens.config import Settings

# Every format decode_image accepts (the test pins this), keyed by the format sniffed from the bytes.
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "DICOM": "application/dicom",
}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "DICOM": ".dcm"}
BROWSER_IMAGE_TYPES = frozenset(t for t in MEDIA_TYPES.values() if t not in ("image/tiff", "application/dicom"))
PARTIAL = ".part"
# Every name ``ImageStore.new_name`` makes (and its unfinished write): the orphan sweep touches nothing else.
OWN_NAME = re.compile(r"^[0-9a-f]{32}(\.jpg|\.png|\.bmp|\.tif|\.webp|\.dcm)(\.part)?$")
log = logging.getLogger("oncolens.storage")
UNREACHABLE = "the image store is not answering or refused the operation; try again shortly"


class StoreError(Unavailable):
    """The image store cannot be reached or refused an operation (HTTP 503).

    ``str()`` is what a client is told (no endpoint, bucket or object key); ``detail`` names them,
    for the server's log and its start-up checks.
    """

    def __init__(self, detail: str, public: str = UNREACHABLE) -> None:
        super().__init__(public)
        self.detail = detail


def free_mb(folder: Path) -> float:
    """Free space in MB on the filesystem that holds ``folder`` (its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free / 2**20


def require_space(folder: Path, min_free_mb: int) -> None:
    """OutOfSpace when ``folder`` keeps less than ``min_free_mb`` free (0: no check)."""
    if min_free_mb <= 0:
        return
    left = free_mb(folder)
    if left < min_free_mb:
        raise OutOfSpace(
            f"the data folder {folder} has {left:.0f} MB free, under ONCOLENS_MIN_FREE_MB={min_free_mb}: new "
            "cases are refused until space is freed (reading, reviewing and signing in go on)"
        )


@dataclass(frozen=True)
class StoredEntry:
    """One file in a store, as the orphan sweep sees it."""

    name: str
    modified: float  # seconds since the epoch
    partial: bool = False  # a write that never finished


class ImageStore(ABC):
    """Where the image files of cases live; names are made by the store."""

    def write(self, data: bytes, image_format: str) -> str:
        """Store ``data`` durably under a new name and return it."""
        name = self.new_name(image_format)
        self.put(name, data)
        return name

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` durably under ``name`` (a name ``new_name`` made; restore keeps the names)."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The stored bytes; FileNotFoundError when the file is gone."""

    @abstractmethod
    def remove(self, names: list[str]) -> None:
        """Remove the named files (names already gone are ignored)."""

    @abstractmethod
    def entries(self) -> Iterator[StoredEntry]:
        """Every file in the store."""

    @abstractmethod
    def describe(self) -> str:
        """Where the files are, for start-up lines and messages (never a secret)."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreError when the store cannot be used (called once at start-up)."""

    @staticmethod
    def new_name(image_format: str) -> str:
        return uuid.uuid4().hex + EXTENSIONS[image_format]

    def sweep_orphans(self, session: Session, older_than_s: float = 600.0, partial_older_than_s: float = 60.0) -> int:
        """Delete files no case refers to (left by a crash before commit); returns how many.

        A finished file waits ``older_than_s`` (its case may be committing, on this server or on
        another replica); an unfinished write goes after ``partial_older_than_s`` (a write takes well
        under a second). The names are read before the files are listed, so a file whose case
        commits in between is younger than the grace period and stays.
        """
        now = time.time()
        known = set(session.exec(select(CaseImage.stored_name)).all())
        doomed = [
            entry.name
            for entry in self.entries()
            if OWN_NAME.match(entry.name)  # never another application's file under the same folder or prefix
            and entry.modified < now - (partial_older_than_s if entry.partial else older_than_s)
            and (entry.partial or entry.name not in known)
        ]
        self.remove(doomed)
        return len(doomed)


class FileStore(ImageStore):
    """Image files under one folder (two-character subfolders), readable by the server's user only."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, stored_name: str) -> Path:
        return self.root / stored_name[:2] / stored_name

    def put(self, name: str, data: bytes) -> None:
        """Write bytes durably under ``name`` (temp file, fsync, rename, fsync dir)."""
        if not OWN_NAME.match(name) or name.endswith(PARTIAL):
            raise ValueError(f"{name!r} is not a name this store makes")
        final = self.path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + PARTIAL)
        try:
            # Patient images: readable by the server's user only.
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # no partial file is left behind
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpace(
                    f"the data folder {self.root} is full: the image could not be stored, the case was not made"
                ) from None
            raise
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.path(name).unlink(missing_ok=True)  # a ".part" name sits beside its final name

    def files(self) -> list[Path]:
        return [p for p in self.root.glob("*/*") if p.is_file()] if self.root.is_dir() else []

    def entries(self) -> Iterator[StoredEntry]:
        for path in self.files():
            try:
                modified = path.stat().st_mtime
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            yield StoredEntry(path.name, modified, partial=path.name.endswith(PARTIAL))

    def describe(self) -> str:
        return f"folder {self.root}"

    def check(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            detail = f"cannot make the image folder {self.root}: {exc.strerror or exc}"
            raise StoreError(detail, detail) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(
                f"the image folder {self.root} is not writable", f"the image folder {self.root} is not writable"
            )


class S3Store(ImageStore):
    """Image files as objects ``PREFIX/ab/<name>`` in one bucket of an S3-compatible service."""

    def __init__(self, bucket: str, prefix: str, client: Any, endpoint: str | None = None) -> None:
        self.bucket, self.prefix, self.client, self.endpoint = bucket, prefix.strip("/"), client, endpoint

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        bucket, prefix = parse_s3_url(settings.image_store)
        return cls(bucket, prefix, s3_client(settings), settings.s3_endpoint_url)

    def key(self, name: str) -> str:
        return "/".join(p for p in (self.prefix, name[:2], name) if p)

    def put(self, name: str, data: bytes) -> None:
        if not OWN_NAME.match(name) or name.endswith(PARTIAL):
            raise ValueError(f"{name!r} is not a name this store makes")
        extension = "." + name.rsplit(".", 1)[-1]
        media_type = MEDIA_TYPES[next(f for f, e in EXTENSIONS.items() if e == extension)]
        self._call("store an image in", self.client.put_object, Key=self.key(name), Body=data, ContentType=media_type)

    def read(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            return bytes(answer["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(name) from None
            raise self._error("read an image from", exc) from None
        except Exception as exc:
            raise self._error("read an image from", exc) from None

    def remove(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            keys = [{"Key": self.key(n)} for n in names[start : start + 1000]]
            self._call("remove images from", self.client.delete_objects, Delete={"Objects": keys, "Quiet": True})

    def entries(self) -> Iterator[StoredEntry]:
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name = str(item["Key"]).rsplit("/", 1)[-1]
                    yield StoredEntry(name, item["LastModified"].timestamp())
        except Exception as exc:
            raise self._error("list the images in", exc) from None

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return where + (f" at {self.endpoint}" if self.endpoint else "")

    def check(self) -> None:
        self._call("reach", self.client.head_bucket)

    def _call(self, action: str, method: Any, **kwargs: Any) -> Any:
        try:
            return method(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise self._error(action, exc) from None

    def _error(self, action: str, exc: Exception) -> StoreError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            reason = {
                "404": "the bucket does not exist",
                "NoSuchBucket": "the bucket does not exist",
                "403": "access denied (check ONCOLENS_S3_ACCESS_KEY_ID and ONCOLENS_S3_SECRET_ACCESS_KEY)",
                "AccessDenied": "access denied (check ONCOLENS_S3_ACCESS_KEY_ID and ONCOLENS_S3_SECRET_ACCESS_KEY)",
                "InvalidAccessKeyId": "the access key is not known (ONCOLENS_S3_ACCESS_KEY_ID)",
                "SignatureDoesNotMatch": "the secret key is wrong (ONCOLENS_S3_SECRET_ACCESS_KEY)",
            }.get(code, f"{code}: {error.get('Message', '')}".strip(": "))
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        detail = f"cannot {action} the image store {self.describe()}: {reason}"
        log.error("%s", detail)
        return StoreError(detail)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix); ValueError saying what is wrong."""
    if not url.startswith("s3://"):
        raise ValueError(f"expected 'file' or s3://BUCKET/PREFIX, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}: expected s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the ``ONCOLENS_S3_*`` settings (path-style addressing; connect and read
    timeouts of ``ONCOLENS_S3_TIMEOUT_S`` and one retry, so a store that hangs costs a request
    seconds, not minutes)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StoreError("an s3:// image store needs boto3: pip install 'oncolens[s3]'") from exc
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret,
        region_name=settings.s3_region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 2, "mode": "standard"},
            connect_timeout=settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            max_pool_connections=32,
        ),
    )


def open_store(settings: Settings) -> ImageStore:
    """The store ``ONCOLENS_IMAGE_STORE`` names: the data folder's ``images/``, or an S3 bucket."""
    if settings.image_store == "file":
        return FileStore(settings.images_dir)
    return S3Store.from_settings(settings)
