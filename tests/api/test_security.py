"""Every finding of the attack on a running server (issue 13), reproduced and kept fixed.

Each test names the finding it pins; on the code before the fix each of them fails.
"""

import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import Session, select

from oncolens.accounts.auth import AuthError, LoginLocked, ThrottlePolicy, authenticate, hash_password
from oncolens.app import create_app
from oncolens.http.middleware import PAGE_CSP
from oncolens.store.db import make_engine, upgrade
from oncolens.store.db.models import CaseImage, LoginThrottle, User
from tests.api.conftest import db_settings
from tests.test_dicom import dicom, ramp

PASSWORD = "correct horse battery"
SECRET = "test-secret-key-that-is-long-enough-for-hs256"
SAMPLES = Path(__file__).parents[2] / "samples"


def add_user(client: TestClient, email: str, role: str) -> None:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        session.add(User(email=email, hashed_password=hash_password(PASSWORD), role=role))
        session.commit()


def bearer(client: TestClient, email: str, password: str = PASSWORD) -> dict[str, str]:
    response = client.post("/api/v1/auth/token", data={"username": email, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def png(width: int, height: int, colour: tuple[int, int, int] = (180, 90, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(model: str) -> bytes:
    return sorted((SAMPLES / model).glob("*.[jp][pn]g"))[0].read_bytes()


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url, compat_upload_max_files=3)
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "admin@clinic.org", "admin")
        add_user(test_client, "doc@clinic.org", "clinician")
        yield test_client


# --- 1. stored script through the skin 7-class upload ---------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/compat/skin7"])
@pytest.mark.parametrize("name", ["evil.html", "evil.svg", "evil.xhtml"])
def test_1_an_uploaded_file_is_served_as_the_image_it_is_never_as_html(client: TestClient, prefix: str, name: str):
    payload = sample("skin-ham10000") + b"<html><script>fetch('/cases')</script></html>"
    response = client.post(
        f"{prefix}/upload-image", files={"file": (name, payload, "text/html")}, headers={"accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    image_path = response.json()["image_path"]
    assert image_path.endswith(".jpg") and "evil" not in image_path, "the server names the file"
    served = client.get(prefix + image_path)
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/jpeg"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert client.get(f"{prefix}/uploads/0123456789abcdef0123456789abcdef_evil.html").status_code == 404


# --- 2. heat-maps and decoded pixels cost bounded memory ------------------------------------------


def test_2_heatmaps_are_display_sized_and_the_peak_is_in_original_pixels(client: TestClient):
    response = client.post(
        "/api/v1/models/skin-ham10000/explain", files={"file": ("wide.png", png(3000, 1500), "image/png")}
    )
    assert response.status_code == 200, response.text
    heat = response.json()["heatmaps"][0]
    import base64

    shown = Image.open(io.BytesIO(base64.b64decode(heat["heatmap_png_base64"])))
    assert shown.size == (1024, 512), "capped at 1024 px on the long side, aspect kept"
    x, y = heat["peak_xy"]
    assert 0 <= x < 3000 and 0 <= y < 1500


def test_2_explanation_memory_does_not_grow_with_the_upload_resolution(client: TestClient):
    import tracemalloc

    from oncolens.vision.cam import explanation

    model = client.app.state.zoo.get("skin-ham10000")  # type: ignore[attr-defined]
    features = np.random.default_rng(0).random((1280, 7, 7)).astype(np.float32)
    peaks = {}
    for side in (1100, 6000):
        image = Image.new("RGB", (side, side), (200, 120, 90))
        tracemalloc.start()
        explained = explanation(model, image, features, original_size=(side, side))
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert Image.open(io.BytesIO(explained.overlay_png)).size == (1024, 1024)
    assert peaks[6000] < 1.1 * peaks[1100], peaks
    assert peaks[6000] < 64 * 2**20, f"NumPy peak {peaks[6000] / 2**20:.0f} MB (6000x6000 float64 maps were > 1 GB)"


def test_2_a_request_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path):
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", max_request_pixels=5_000_000)
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"{i}.png", png(2000, 1000), "image/png")) for i in range(3)]
        response = client.post("/api/v1/models/skin-ham10000/predict", files=files)
    assert response.status_code == 413
    assert "6.0 MP together, over the limit of 5 MP per request" in response.json()["detail"]


def test_2_a_long_thin_ultrasound_frame_is_letterboxed_without_a_giant_canvas():
    from oncolens.zoo.preprocess import resize_rgb

    start = time.perf_counter()
    out = resize_rgb(Image.new("RGB", (40_000, 1_000), (90, 90, 90)), 224, "pad", grayscale=True)
    assert out.shape == (224, 224, 3)
    assert time.perf_counter() - start < 5, "a 40000^2 canvas (4.8 GB) was built before"
    assert out[112, 112, 0] == 90 and out[0, 112, 0] == 0, "image in the middle, black bars above and below"


# --- 3. the login lock cannot be raced -------------------------------------------------------------


def _parallel_logins(url: str, passwords: list[str], email: str) -> list[str]:
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as session:
        session.add(User(email=email, hashed_password=hash_password(PASSWORD), role="clinician"))
        session.commit()
    policy, outcomes = ThrottlePolicy(max_failures=5, lock_minutes=15), []
    barrier = threading.Barrier(len(passwords))

    def attempt(password: str) -> None:
        barrier.wait()
        with Session(engine) as session:
            try:
                authenticate(session, email, password, policy)
                outcomes.append("accepted")
            except LoginLocked:
                outcomes.append("locked")
            except AuthError:
                outcomes.append("wrong")
            except Exception as exc:  # what the old code did: UNIQUE login_throttle.email -> 500
                outcomes.append(f"error: {type(exc).__name__}")

    threads = [threading.Thread(target=attempt, args=(p,)) for p in passwords]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Session(engine) as session:
        assert session.get(LoginThrottle, email) is not None
    engine.dispose()
    return outcomes


def test_3_thirty_parallel_wrong_passwords_check_five_and_lock(database_url: str):
    outcomes = _parallel_logins(database_url, ["wrong password!"] * 30, "race1@clinic.org")
    assert sorted(set(outcomes)) == ["locked", "wrong"], outcomes
    assert outcomes.count("wrong") == 5, "exactly max_failures passwords are checked"


def test_3_the_right_password_among_parallel_guesses_is_checked_at_most_with_four_others(database_url: str):
    outcomes = _parallel_logins(database_url, ["wrong password!"] * 29 + [PASSWORD], "race2@clinic.org")
    assert not [o for o in outcomes if o.startswith("error")], outcomes
    assert outcomes.count("wrong") + outcomes.count("accepted") <= 5, outcomes


# --- 4. DICOM cases --------------------------------------------------------------------------------


def test_4_a_case_with_a_dicom_image_is_stored_served_and_reported(client: TestClient):
    headers = bearer(client, "doc@clinic.org")
    frame = dicom(ramp(96, 128), "MONOCHROME2", bits=12, WindowCenter=2048, WindowWidth=4096)
    response = client.post(
        "/api/v1/cases",
        data={"model_id": "breast-us", "patient_ref": "PT-DCM"},
        files={"files": ("us.dcm", frame, "application/dicom")},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    case = response.json()
    image = case["images"][0]
    assert (image["media_type"], image["width"], image["height"]) == ("application/dicom", 128, 96)
    original = client.get(image["url"], headers=headers)
    assert original.headers["content-type"] == "application/dicom" and original.content == frame
    assert client.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=headers).status_code == 200
    assert client.get(f"/api/v1/cases/{case['id']}/fhir", headers=headers).status_code == 200


# --- 5. tokens end with a password change, a reset, a deactivation and a logout --------------------


def test_5_a_password_change_revokes_the_old_tokens(client: TestClient):
    add_user(client, "pw@clinic.org", "clinician")
    old, other = bearer(client, "pw@clinic.org"), bearer(client, "pw@clinic.org")
    changed = client.patch(
        "/api/v1/users/me", json={"password": "a brand new password", "current_password": PASSWORD}, headers=old
    )
    assert changed.status_code == 200
    for token in (old, other):
        refused = client.get("/api/v1/cases", headers=token)
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert (
        client.get("/api/v1/cases", headers=bearer(client, "pw@clinic.org", "a brand new password")).status_code == 200
    )


def test_5_an_admin_reset_and_a_deactivation_revoke_the_users_tokens(client: TestClient):
    add_user(client, "reset@clinic.org", "clinician")
    admin = bearer(client, "admin@clinic.org")
    users = client.get("/api/v1/users", headers=admin).json()
    user_id = next(u["id"] for u in users if u["email"] == "reset@clinic.org")
    for change in ({"password": "reset by the admin"}, {"is_active": False}):
        token = bearer(
            client, "reset@clinic.org", change.get("password", PASSWORD) if "is_active" in change else PASSWORD
        )
        assert client.patch(f"/api/v1/users/{user_id}", json=change, headers=admin).status_code == 200
        assert client.get("/api/v1/users/me", headers=token).status_code == 401
        if "password" in change:
            client.patch(f"/api/v1/users/{user_id}", json={"password": PASSWORD}, headers=admin)


def test_5_api_logout_ends_that_token_only(client: TestClient):
    first, second = bearer(client, "doc@clinic.org"), bearer(client, "doc@clinic.org")
    assert client.post("/api/v1/auth/logout", headers=first).status_code == 204
    assert client.get("/api/v1/users/me", headers=first).status_code == 401
    assert client.get("/api/v1/users/me", headers=second).status_code == 200


def test_5_web_logout_revokes_the_session_cookie(client: TestClient):
    login = client.get("/login")
    csrf = client.cookies.get("oncolens_csrf")
    assert login.status_code == 200 and csrf
    done = client.post(
        "/login",
        data={"email": "doc@clinic.org", "password": PASSWORD, "csrf_token": csrf, "next": "/cases"},
        follow_redirects=False,
    )
    assert done.status_code == 303
    cookie = client.cookies.get("oncolens_session")
    assert cookie
    csrf = client.cookies.get("oncolens_csrf")  # a new one came with the login
    client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    client.cookies.set("oncolens_session", cookie)  # the old cookie, replayed
    page = client.get("/cases", follow_redirects=False)
    assert page.status_code in (302, 303, 307) and "/login" in page.headers["location"]
    assert client.get("/api/v1/cases", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401
    client.cookies.clear()


# --- 6. the anonymous upload store is bounded; predict can require a login --------------------------


def test_6_the_upload_store_keeps_its_quota_and_expires_old_files(client: TestClient):
    folder = client.app.state.settings.data_dir / "compat-uploads"  # type: ignore[attr-defined]
    for _ in range(5):
        client.post(
            "/upload-image", files={"file": ("x.jpg", sample("skin-ham10000"))}, headers={"accept": "application/json"}
        )
    assert len(list(folder.iterdir())) == 3, "compat_upload_max_files=3"
    old = next(iter(folder.iterdir()))
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    client.post(
        "/upload-image", files={"file": ("x.jpg", sample("skin-ham10000"))}, headers={"accept": "application/json"}
    )
    assert not old.exists(), "uploads older than compat_upload_keep_minutes are removed"


def test_6_a_setting_requires_a_login_on_the_predict_and_compat_routes(tmp_path: Path):
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", require_auth_for_predict=True)
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        image = sample("skin-ham10000")
        routes = ["/api/v1/models/skin-ham10000/predict", "/predict", "/upload-image", "/compat/cervical/predict"]
        for route in routes:
            refused = client.post(route, files={"file": ("a.jpg", image)})
            assert refused.status_code == 401, route
            assert "ONCOLENS_REQUIRE_AUTH_FOR_PREDICT" in refused.json()["detail"]
        headers = bearer(client, "doc@clinic.org")
        for route in routes[:3]:
            assert client.post(route, files={"file": ("a.jpg", image)}, headers=headers).status_code == 200, route
        assert client.get("/health").status_code == 200, "health stays open"


# --- 7. request bodies are bounded by the image limits ---------------------------------------------


def test_7_the_json_body_limit_follows_the_image_limits(tmp_path: Path):
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", max_request_bytes=1_000_000)
    assert settings.max_body_bytes == 1_333_334 + 65_536
    with TestClient(create_app(settings)) as client:
        body = b'{"image": "' + b"A" * 1_500_000 + b'"}'
        declared = client.post(
            "/api/v1/models/skin-ham10000/predict", content=body, headers={"content-type": "application/json"}
        )

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 65_536):
                yield body[start : start + 65_536]

        streamed = client.post(
            "/api/v1/models/skin-ham10000/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        multipart = client.post(
            "/api/v1/models/skin-ham10000/predict",
            files=[("files", (f"{i}.jpg", b"\xff\xd8\xff" + b"\0" * 600_000)) for i in range(3)],
        )
    for response in (declared, streamed, multipart):
        assert response.status_code == 413
        assert "larger than the limit of 1,398,870 bytes" in response.json()["detail"]


# --- 8. client input never causes a 500 ------------------------------------------------------------


def test_8_palette_dicom_without_its_lookup_table_is_a_400():
    from oncolens.vision.decode import ImageDecodeError, decode_image

    with pytest.raises(ImageDecodeError) as error:
        decode_image(dicom(ramp(16, 16, 255).astype(np.uint8), "PALETTE COLOR", bits=8))
    assert error.value.status == 400 and "PALETTE COLOR" in str(error.value)


def test_8_client_input_edge_cases_are_4xx(client: TestClient):
    admin = bearer(client, "admin@clinic.org")
    nested = client.post(
        "/api/v1/models/skin-ham10000/predict", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert nested.status_code == 400 and "nested too deeply" in nested.json()["detail"]
    huge = str(2**63)
    for url in (f"/api/v1/cases?offset={huge}", f"/api/v1/audit?user_id={huge}", f"/api/v1/users/{huge}",
                f"/api/v1/audit?offset={huge}", f"/api/v1/result/results/?skip={huge}"):  # fmt: skip
        response = client.get(url, headers=admin)
        assert response.status_code == 422, url
        assert "less than or equal to 2147483647" in response.json()["detail"]
    me = client.get("/api/v1/users/me", headers=admin).json()
    for url, body in ((f"/api/v1/users/{me['id']}", {"role": None}), ("/api/v1/users/me", {"full_name": None})):
        response = client.patch(url, json=body, headers=admin)
        assert response.status_code == 422
        assert "cannot be null; leave a field out to keep its value" in response.json()["detail"]
    forged = jwt.encode({"sub": "admin", "jti": "x", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401 and response.json()["detail"] == "the access token is not valid"


def test_8_a_null_in_a_case_review_is_refused_and_changes_nothing(client: TestClient):
    headers = bearer(client, "doc@clinic.org")
    created = client.post(
        "/api/v1/cases",
        data={"model_id": "skin-ham10000", "patient_ref": "PT-NULL"},
        files={"files": ("a.jpg", sample("skin-ham10000"))},
        headers=headers,
    ).json()
    response = client.patch(f"/api/v1/cases/{created['id']}", json={"status": None}, headers=headers)
    assert response.status_code == 422 and "status cannot be null" in response.json()["detail"]
    assert client.get(f"/api/v1/cases/{created['id']}", headers=headers).json()["review"]["status"] == "pending_review"


# --- 9. security headers everywhere ----------------------------------------------------------------


def test_9_every_response_carries_the_security_headers(client: TestClient):
    for url in ("/login", "/api/v1/models", "/api/v1/cases", "/static/app.js", "/no-such-page"):
        headers = client.get(url).headers
        assert headers["x-content-type-options"] == "nosniff", url
        assert headers["x-frame-options"] == "DENY", url
        assert headers["referrer-policy"] == "no-referrer", url
        assert headers["content-security-policy"] == PAGE_CSP, url
    script_src = next(part for part in PAGE_CSP.split(";") if part.strip().startswith("script-src"))
    assert "unsafe-inline" not in script_src and "frame-ancestors 'none'" in PAGE_CSP


# --- 10. the skin 7-class flow works at the root ----------------------------------------------------


def test_10_the_root_upload_page_posts_to_the_skin7_predict(client: TestClient):
    page = client.post("/upload-image", files={"file": ("lesion.jpg", sample("skin-ham10000"))})
    assert page.status_code == 200
    assert "action='/compat/skin7/predict'" in page.text, "the root /predict is the 9-class app's by default"
    image_path = page.text.split("name='image_path' value='")[1].split("'")[0]
    result = client.post("/compat/skin7/predict", data={"image_path": image_path})
    assert result.status_code == 200 and "Skin lesion classification" in result.text


# --- 11. orphans are swept while the server runs, .part files included -----------------------------


def test_11_orphans_and_part_files_are_swept_periodically(tmp_path: Path):
    settings = db_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", orphan_sweep_minutes=0.01)
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        created = client.post(
            "/api/v1/cases",
            data={"model_id": "skin-ham10000", "patient_ref": "PT-SWEEP"},
            files={"files": ("a.jpg", sample("skin-ham10000"))},
            headers=bearer(client, "doc@clinic.org"),
        )
        assert created.status_code == 201
        folder = settings.images_dir / "ab"
        folder.mkdir(parents=True, exist_ok=True)
        names = ("ab" + "1" * 30 + ".jpg", "ab" + "3" * 30 + ".jpg.part", "ab" + "5" * 30 + ".jpg")
        orphan, partial, fresh = (folder / name for name in names)
        foreign = folder / "notes-of-another-app.txt"  # not a name the store makes: never swept
        for path, age in ((orphan, 3600), (partial, 120), (fresh, 0), (foreign, 3600)):
            path.write_bytes(b"x")
            os.utime(path, (time.time() - age, time.time() - age))
        stored = client.app.state.store  # type: ignore[attr-defined]
        with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
            kept = stored.path(session.exec(select(CaseImage.stored_name)).one())
        os.utime(kept, (time.time() - 3600, time.time() - 3600))
        deadline = time.time() + 10
        while (orphan.exists() or partial.exists()) and time.time() < deadline:
            time.sleep(0.1)
        assert not orphan.exists() and not partial.exists(), "swept while running, not only at start"
        assert fresh.exists(), "a file whose case may be committing is left alone"
        assert kept.exists(), "a file a case refers to is never swept"
        assert foreign.exists(), "only names the server's own scheme could have written are swept"


# --- 12. the SQLite file is private ------------------------------------------------------------------


def test_12_the_sqlite_database_is_created_readable_by_its_owner_only(tmp_path: Path):
    (tmp_path / "private").mkdir()  # a database outside the data folder goes in a folder that exists
    with TestClient(create_app(db_settings(tmp_path, f"sqlite:///{tmp_path / 'private' / 'oncolens.db'}"))):
        pass
    for name in ("oncolens.store.db", "oncolens.db-wal"):
        path = tmp_path / "private" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


# --- 13. the OpenAPI document tells the truth -------------------------------------------------------


def test_13_every_reference_in_the_openapi_document_resolves(client: TestClient):
    spec = client.get("/openapi.json").json()

    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(spec)):
        target: object = spec
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"{ref} does not resolve"
            target = target[part]
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"]["detail"]["type"] == "string"


def test_13_validation_errors_are_strings_and_times_carry_their_zone(client: TestClient):
    headers = bearer(client, "admin@clinic.org")
    invalid = client.get("/api/v1/cases?limit=0", headers=headers)
    assert invalid.status_code == 422
    assert invalid.json() == {"detail": "query.limit: Input should be greater than or equal to 1"}
    me = client.get("/api/v1/users/me", headers=headers).json()
    assert me["created_at"].endswith(("Z", "+00:00")), me["created_at"]
    assert json.dumps(me)  # plain JSON
