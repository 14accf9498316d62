"""Cases through the real app: roles, filters, review, delete, durability (SQLite and PostgreSQL)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from oncolens.app import create_app
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
MEL, NV, BCC = "ISIC_0025316.jpg", "ISIC_0025958.jpg", "ISIC_0026213.jpg"


def image(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url, max_images_per_request=3)
    with TestClient(create_app(settings)) as test_client:
        for email, role in [
            ("admin@clinic.org", "admin"),
            ("ana@clinic.org", "clinician"),
            ("ben@clinic.org", "clinician"),
            ("vic@clinic.org", "viewer"),
        ]:
            add_user(test_client, email, role)
        yield test_client


@pytest.fixture(scope="module")
def tokens(client: TestClient) -> dict[str, dict[str, str]]:
    return {name: login(client, f"{name}@clinic.org") for name in ("admin", "ana", "ben", "vic")}


def new_case(client: TestClient, headers: dict[str, str], names: list[str], **fields: object) -> dict:
    data = {"model_id": "skin-ham10000", "patient_ref": "P-001", "patient_age": "54", "patient_sex": "female"}
    data |= {k: str(v) for k, v in fields.items()}
    files = [("files", (n, image(n), "image/jpeg")) for n in names]
    response = client.post("/api/v1/cases", data=data, files=files, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def stored_files(client: TestClient) -> set[str]:
    return {p.name for p in client.app.state.store.files()}  # type: ignore[attr-defined]


def test_create_case_stores_images_results_and_aggregate(client: TestClient, tokens: dict) -> None:
    before = stored_files(client)
    case = new_case(client, tokens["ana"], [MEL, NV], patient_name="Ana Patient", clinical_notes="changing mole")
    assert case["model_id"] == "skin-ham10000" and case["review"]["status"] == "pending_review"
    assert case["patient"] == {
        "ref": "P-001",
        "name": "Ana Patient",
        "age": 54,
        "sex": "female",
        "email": "",
        "clinical_notes": "changing mole",
    }
    assert [i["filename"] for i in case["images"]] == [MEL, NV]
    per_image = [i["result"]["probabilities"] for i in case["images"]]
    for cls, p in case["result"]["probabilities"].items():
        assert p == pytest.approx((per_image[0][cls] + per_image[1][cls]) / 2)
    new_files = stored_files(client) - before
    assert len(new_files) == 2
    assert not any(MEL in name or NV in name for name in new_files)  # never the client's file name
    download = client.get(case["images"][0]["url"], headers=tokens["ana"])
    assert download.status_code == 200 and download.content == image(MEL)
    assert download.headers["content-type"] == "image/jpeg"


def test_bad_case_requests_are_explained_and_store_nothing(client: TestClient, tokens: dict) -> None:
    before, headers = stored_files(client), tokens["ana"]
    total = client.get("/api/v1/cases", headers=tokens["admin"]).json()["total"]
    cases = [
        ({"model_id": "skin-ham10000"}, [("files", ("a.jpg", image(MEL)))], 422, "patient reference"),
        (
            {"model_id": "skin-ham10000", "patient_ref": "R" * 129, "patient_name": "N" * 256},
            [("files", ("a.jpg", image(MEL)))],
            422,
            "patient_ref: String should have at most 128 characters; patient_name: String should have at most 255",
        ),
        (
            {"model_id": "skin-ham10000", "patient_ref": "x", "patient_email": "not-mail"},
            [("files", ("a.jpg", image(MEL)))],
            422,
            "patient_email: value is not a valid email address",
        ),
        ({"model_id": "lungs", "patient_ref": "x"}, [("files", ("a.jpg", image(MEL)))], 404, "no model 'lungs'"),
        (
            {"model_id": "skin-ham10000", "patient_ref": "x"},
            [("files", ("a.jpg", image(MEL))), ("files", ("b.txt", b"not an image"))],
            415,
            "image 2 (b.txt)",
        ),
        ({"model_id": "skin-ham10000", "patient_ref": "x"}, [("files", ("a.jpg", image(MEL)))] * 4, 413, "at most 3"),
    ]
    for data, files, status, message in cases:
        response = client.post("/api/v1/cases", data=data, files=files, headers=headers)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
    assert (
        client.post(
            "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "x"}, headers=headers
        ).status_code
        == 422
    )
    assert stored_files(client) == before
    assert client.get("/api/v1/cases", headers=tokens["admin"]).json()["total"] == total


ROUTES = ["list", "get", "image", "review", "delete", "create"]
# who -> route -> expected status on a case owned by ana
MATRIX = {
    "ana": {"list": 200, "get": 200, "image": 200, "review": 200, "delete": 204, "create": 201},
    "ben": {"list": 200, "get": 404, "image": 404, "review": 404, "delete": 404, "create": 201},
    "vic": {"list": 200, "get": 200, "image": 200, "review": 403, "delete": 403, "create": 403},
    "admin": {"list": 200, "get": 200, "image": 200, "review": 200, "delete": 204, "create": 201},
    "anonymous": {"list": 401, "get": 401, "image": 401, "review": 401, "delete": 401, "create": 401},
}


@pytest.mark.parametrize("who", list(MATRIX))
@pytest.mark.parametrize("route", ROUTES)
def test_role_matrix(client: TestClient, tokens: dict, who: str, route: str) -> None:
    case = new_case(client, tokens["ana"], [BCC], patient_ref=f"M-{who}-{route}")
    headers = tokens.get(who, {})
    url = f"/api/v1/cases/{case['id']}"
    if route == "list":
        response = client.get("/api/v1/cases", params={"patient_ref": f"M-{who}-{route}"}, headers=headers)
    elif route == "get":
        response = client.get(url, headers=headers)
    elif route == "image":
        response = client.get(case["images"][0]["url"], headers=headers)
    elif route == "review":
        response = client.patch(url, json={"status": "reviewed"}, headers=headers)
    elif route == "delete":
        response = client.delete(url, headers=headers)
    else:
        files = [("files", ("x.jpg", image(BCC), "image/jpeg"))]
        response = client.post(
            "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "new"}, files=files, headers=headers
        )
    assert response.status_code == MATRIX[who][route], response.text
    if route == "list" and response.status_code == 200:
        # another clinician's list does not include ana's case
        assert response.json()["total"] == (0 if who == "ben" else 1)


def test_pagination_and_filters_count_all_pages(client: TestClient, tokens: dict) -> None:
    ids = [new_case(client, tokens["ben"], [NV], patient_ref="PAGE")["id"] for _ in range(5)]
    headers = tokens["ben"]
    page = client.get("/api/v1/cases", params={"patient_ref": "PAGE", "limit": 2, "offset": 2}, headers=headers).json()
    assert page["total"] == 5 and page["limit"] == 2 and len(page["items"]) == 2
    everything = client.get("/api/v1/cases", params={"patient_ref": "PAGE", "limit": 10}, headers=headers).json()
    assert sorted(c["id"] for c in everything["items"]) == sorted(ids)
    assert [c["id"] for c in page["items"]] == [c["id"] for c in everything["items"]][2:4]
    client.patch(f"/api/v1/cases/{ids[0]}", json={"status": "confirmed"}, headers=headers)
    confirmed = client.get("/api/v1/cases", params={"patient_ref": "PAGE", "status": "confirmed"}, headers=headers)
    assert [c["id"] for c in confirmed.json()["items"]] == [ids[0]]
    level = everything["items"][0]["risk_level"]
    by_risk = client.get("/api/v1/cases", params={"patient_ref": "PAGE", "risk_level": level}, headers=headers).json()
    assert by_risk["total"] == sum(c["risk_level"] == level for c in everything["items"])
    future = client.get(
        "/api/v1/cases", params={"patient_ref": "PAGE", "created_from": "2100-01-01T00:00:00Z"}, headers=headers
    ).json()
    past = client.get(
        "/api/v1/cases", params={"patient_ref": "PAGE", "created_to": "2000-01-01T00:00:00Z"}, headers=headers
    ).json()
    assert future["total"] == past["total"] == 0
    by_model = client.get("/api/v1/cases", params={"patient_ref": "PAGE", "model_id": "other"}, headers=headers)
    assert by_model.json()["total"] == 0
    assert client.get("/api/v1/cases", params={"limit": 0}, headers=headers).status_code == 422


def test_review_round_trip_is_stored_and_audited(client: TestClient, tokens: dict) -> None:
    case = new_case(client, tokens["ana"], [MEL], patient_ref="REVIEW")
    body = {"status": "confirmed", "confirmed_diagnosis": "melanoma in situ", "review_notes": "excised 2026-11-20"}
    patched = client.patch(f"/api/v1/cases/{case['id']}", json=body, headers=tokens["ana"]).json()
    again = client.get(f"/api/v1/cases/{case['id']}", headers=tokens["ana"]).json()
    for review in (patched["review"], again["review"]):
        assert review["status"] == "confirmed" and review["confirmed_diagnosis"] == "melanoma in situ"
        assert review["notes"] == "excised 2026-11-20" and review["reviewed_by"] is not None
    assert again["result"] == case["result"]  # the model's result is never overwritten
    bad = client.patch(f"/api/v1/cases/{case['id']}", json={"status": "closed"}, headers=tokens["ana"])
    assert bad.status_code == 422
    empty = client.patch(f"/api/v1/cases/{case['id']}", json={}, headers=tokens["ana"])
    assert empty.status_code == 422 and "nothing to update" in empty.json()["detail"]
    audit = client.get("/api/v1/audit", params={"case_id": case["id"]}, headers=tokens["admin"]).json()
    assert [e["action"] for e in reversed(audit["items"])] == ["create", "review", "view"]
    assert all(e["actor"] == "ana@clinic.org" for e in audit["items"])


def test_delete_removes_the_files_and_is_audited(client: TestClient, tokens: dict) -> None:
    case = new_case(client, tokens["ana"], [MEL, BCC], patient_ref="DELETE")
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        from sqlmodel import select

        from oncolens.store.db.models import CaseImage

        names = [i.stored_name for i in session.exec(select(CaseImage).where(CaseImage.case_id == case["id"]))]
    assert len(names) == 2 and set(names) <= stored_files(client)
    assert client.delete(f"/api/v1/cases/{case['id']}", headers=tokens["ana"]).status_code == 204
    assert not set(names) & stored_files(client)
    assert client.get(f"/api/v1/cases/{case['id']}", headers=tokens["ana"]).status_code == 404
    events = client.get("/api/v1/audit", params={"case_id": case["id"], "action": "delete"}, headers=tokens["admin"])
    assert events.json()["total"] == 1


def test_failure_after_image_write_before_commit_leaves_no_case_and_no_file(
    client: TestClient, tokens: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    before_files = stored_files(client)
    before_total = client.get("/api/v1/cases", headers=tokens["admin"]).json()["total"]
    written: list[str] = []
    store = client.app.state.store  # type: ignore[attr-defined]
    original_write = store.write

    def write_then_record(data: bytes, fmt: str) -> str:
        name = original_write(data, fmt)
        written.append(name)
        return name

    def failing_commit(self: Session) -> None:
        assert written and all(store.path(n).is_file() for n in written)  # files are on disk now
        raise RuntimeError("injected: the database went away")

    monkeypatch.setattr(store, "write", write_then_record)
    monkeypatch.setattr(Session, "commit", failing_commit)
    safe = TestClient(client.app, raise_server_exceptions=False)
    files = [("files", (n, image(n), "image/jpeg")) for n in (MEL, NV)]
    response = safe.post(
        "/api/v1/cases", data={"model_id": "skin-ham10000", "patient_ref": "FAIL"}, files=files, headers=tokens["ana"]
    )
    monkeypatch.undo()
    assert response.status_code == 500 and "internal error" in response.json()["detail"]
    assert len(written) == 2
    assert stored_files(client) == before_files
    assert client.get("/api/v1/cases", headers=tokens["admin"]).json()["total"] == before_total


def test_audit_log_is_for_admins(client: TestClient, tokens: dict) -> None:
    events = client.get("/api/v1/audit", params={"limit": 500}, headers=tokens["admin"]).json()
    actions = {e["action"] for e in events["items"]}
    assert {"login", "create", "view", "review", "delete", "image_view"} <= actions
    assert client.get("/api/v1/audit", headers=tokens["ana"]).status_code == 403
    assert client.get("/api/v1/audit", headers=tokens["vic"]).status_code == 403
