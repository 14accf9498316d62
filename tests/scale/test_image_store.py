"""Case images in S3-compatible object storage (a real SeaweedFS server): the same guarantees as the
data folder — written before the rows commit, removed when the commit fails or the case is deleted,
orphans swept — and clear errors when the store is unreachable or refuses us."""

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.runtime.startup import StartupError, check_image_store
from oncolens.store.images import UNREACHABLE, S3Store, StoreError, open_store
from tests.api.test_auth_users import add_user, login
from tests.live import free_port
from tests.seaweed import S3Server

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
MEL, NV = "ISIC_0025316.jpg", "ISIC_0025958.jpg"


def s3_settings(data_dir: Path, s3: S3Server, bucket: str, **overrides: object) -> Settings:
    fields = {k.removeprefix("ONCOLENS_").lower(): v for k, v in s3.env(bucket).items()}
    return Settings(data_dir=data_dir, **(fields | overrides))  # type: ignore[arg-type]


def objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return s3.bucket(f"cases-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def client(s3: S3Server, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = s3_settings(tmp_path_factory.mktemp("data"), s3, bucket)
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "ana@clinic.org", "clinician")
        yield test_client


def new_case(client: TestClient, headers: dict[str, str], names: list[str], expect: int = 201) -> dict:
    files = [("files", (n, (SAMPLES / n).read_bytes(), "image/jpeg")) for n in names]
    response = client.post(
        "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "S3-1"}, files=files, headers=headers
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


def test_a_case_lives_in_the_bucket_and_goes_with_its_deletion(client: TestClient, s3: S3Server, bucket: str) -> None:
    ana = login(client, "ana@clinic.org")
    assert not (client.app.state.settings.data_dir / "images").exists()  # type: ignore[attr-defined]
    case = new_case(client, ana, [MEL, NV])
    stored = objects(s3, bucket)
    # the objects are the uploaded bytes, under PREFIX/ab/<random name>, never the client's file name
    assert len(stored) == 2 and sorted(stored.values()) == sorted((SAMPLES / n).read_bytes() for n in (MEL, NV))
    assert all(key.startswith("cases/") and key.split("/")[1] == key.split("/")[2][:2] for key in stored)
    assert not any(MEL in key or NV in key for key in stored)
    first = case["images"][0]
    got = client.get(f"/api/v1/cases/{case['id']}/images/{first['id']}", headers=ana)
    assert got.status_code == 200 and got.content == (SAMPLES / MEL).read_bytes()
    assert got.headers["content-type"] == "image/jpeg"
    # the report recomputes each heat-map from the stored object
    report = client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=ana)
    assert report.status_code == 200 and report.content.startswith(b"%PDF")
    assert client.delete(f"/api/v1/cases/{case['id']}", headers=ana).status_code == 204
    assert objects(s3, bucket) == {}


def test_a_failed_commit_removes_the_objects_it_wrote(
    client: TestClient, s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ana = login(client, "ana@clinic.org")
    before = objects(s3, bucket)
    seen: list[int] = []

    def failing_commit(self: Session) -> None:
        seen.append(len(objects(s3, bucket)) - len(before))  # the objects are in the bucket now
        raise RuntimeError("injected: the database went away")

    monkeypatch.setattr(Session, "commit", failing_commit)
    safe = TestClient(client.app, raise_server_exceptions=False)
    response = new_case(safe, ana, [MEL, NV], expect=500)
    monkeypatch.undo()
    assert "internal error" in response["detail"]
    assert seen == [2] and objects(s3, bucket) == before


def test_a_lost_object_is_410_and_orphans_are_swept(client: TestClient, s3: S3Server, bucket: str) -> None:
    ana = login(client, "ana@clinic.org")
    case = new_case(client, ana, [MEL])
    store: S3Store = client.app.state.store  # type: ignore[attr-defined]
    key = next(iter(objects(s3, bucket)))
    s3.client().delete_object(Bucket=bucket, Key=key)
    image = case["images"][0]["id"]
    lost = client.get(f"/api/v1/cases/{case['id']}/images/{image}", headers=ana)
    assert lost.status_code == 410 and "missing from storage" in lost.json()["detail"]
    # an object no case refers to (a crash between write and commit) goes once past the grace period
    orphan = store.write((SAMPLES / NV).read_bytes(), "JPEG")
    kept = store.write((SAMPLES / MEL).read_bytes(), "JPEG")
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        assert store.sweep_orphans(session, older_than_s=3600) == 0  # too young: its case may be committing
        from oncolens.store.db.models import CaseImage

        row = session.get(CaseImage, image)
        assert row is not None
        row.stored_name = kept  # the case now refers to this one
        session.add(row)
        session.commit()
        assert store.sweep_orphans(session, older_than_s=0) == 1
    assert [k.rsplit("/", 1)[1] for k in objects(s3, bucket)] == [kept]
    assert orphan not in {e.name for e in store.entries()}


def test_an_unreachable_or_refusing_store_is_named(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    missing = s3_settings(tmp_path, s3, "no-such-bucket")
    with pytest.raises(StartupError, match=r"no-such-bucket.*the bucket does not exist.*ONCOLENS_IMAGE_STORE"):
        check_image_store(missing)
    wrong = s3_settings(tmp_path, s3, bucket, s3_secret_access_key="not-the-secret")
    refused = r"access denied \(check ONCOLENS_S3_ACCESS_KEY_ID and ONCOLENS_S3_SECRET_ACCESS_KEY\)$"
    with pytest.raises(StoreError) as caught:
        open_store(wrong).check()
    assert re.search(refused, caught.value.detail), caught.value.detail
    down = s3_settings(tmp_path, s3, bucket, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError) as caught:
        open_store(down).check()
    assert caught.value.detail.startswith(f"cannot reach the image store s3://{bucket}/cases at http://127.0.0.1")
    # What a client is told names neither the endpoint nor the bucket (issue 38, finding 17).
    assert str(caught.value) == UNREACHABLE
    check_image_store(s3_settings(tmp_path, s3, bucket))  # the right one passes


def test_a_store_that_goes_down_answers_503_and_keeps_no_case(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    down = s3_settings(tmp_path, s3, bucket, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with TestClient(create_app(down)) as client:  # it starts (the sweep waits), and says why it cannot store
        add_user(client, "ana@clinic.org", "clinician")
        ana = login(client, "ana@clinic.org")
        answer = new_case(client, ana, [MEL], expect=503)
        assert answer["detail"] == UNREACHABLE and bucket not in answer["detail"]
        assert client.get("/api/v1/cases", headers=ana).json()["total"] == 0


def test_bad_store_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="ONCOLENS_IMAGE_STORE must be 'file' or s3://BUCKET/PREFIX"):
        Settings(image_store="gs://bucket")
    with pytest.raises(ValueError, match="ONCOLENS_IMAGE_STORE must be 'file' or s3://BUCKET/PREFIX"):
        Settings(image_store="s3://")
    with pytest.raises(ValueError, match="ONCOLENS_S3_ENDPOINT_URL must start with http"):
        Settings(s3_endpoint_url="127.0.0.1:8333")
