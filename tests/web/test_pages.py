"""The web pages through FastAPI's TestClient (no browser): forms, messages, and the audit of every read."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from oncolens.app import create_app
from oncolens.store.db.models import AuditEvent, Case
from tests.api.conftest import db_settings
from tests.api.test_auth_users import PASSWORD, add_user, login

SAMPLE = Path(__file__).parents[2] / "samples" / "skin-ham10000" / "ISIC_0025316.jpg"
CARD = Path(__file__).parents[2] / "src" / "oncolens" / "zoo" / "skin-ham10000" / "card.json"


@pytest.fixture(scope="module")
def app_client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("data"), database_url)
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        add_user(client, "view@clinic.org", "viewer")
        yield client


def web_login(client: TestClient, email: str) -> TestClient:
    """A second client on the same app, logged in to the web pages (CSRF cookie + form token)."""
    browser = TestClient(client.app)
    browser.get("/login")
    token = browser.cookies["oncolens_csrf"]
    response = browser.post(
        "/login", data={"email": email, "password": PASSWORD, "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return browser


def analyze(browser: TestClient, **fields: str) -> object:
    data = {"model_id": "skin-ham10000", "patient_ref": "W-1", "csrf_token": browser.cookies["oncolens_csrf"]} | fields
    files = [("files", ("lesion.jpg", SAMPLE.read_bytes(), "image/jpeg"))]
    return browser.post("/analyze", data=data, files=files)


def case_count(client: TestClient) -> int:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        return len(session.exec(select(Case)).all())


def test_the_analyze_page_stores_a_case_and_shows_its_result(app_client: TestClient) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    before = case_count(app_client)
    page = analyze(browser, patient_age="61", patient_sex="female")
    assert page.status_code == 200  # type: ignore[attr-defined]
    assert "Decision support only" in page.text  # type: ignore[attr-defined]
    assert case_count(app_client) == before + 1


def test_a_distilled_models_page_shows_calibration_at_small_n_and_its_teachers(app_client: TestClient) -> None:
    card = json.loads((Path(__file__).parents[2] / "src/oncolens/zoo/thyroid-us/card.json").read_text())
    page = web_login(app_client, "view@clinic.org").get("/models/thyroid-us").text
    cal = card["metrics"]["calibration"]
    for key in ("adaptive_ece", "classwise_ece", "brier", "nll"):
        assert f"<td>{cal[key]:.3f}</td>" in page, key
    assert f"{cal['consistency_p']['ece']:.3f}" in page
    teachers = card["training"]["teachers"]
    assert f"ensemble of {teachers['models']} teachers" in page
    assert f"<td>{teachers['test']['macro_auc']:.3f}</td>" in page
    assert f"Called suspicious at P(suspicious) ≥ {card['risk_policy']['malignant_threshold']:.3f}" in page
    assert "Suspicious vs not: auc" in page and "Malignant vs benign" not in page


def test_a_soup_models_page_says_the_teachers_average_serves(app_client: TestClient) -> None:
    card = json.loads((Path(__file__).parents[2] / "src/oncolens/zoo/oral-photo/card.json").read_text())
    assert card["training"]["method"] == "soup"
    page = web_login(app_client, "view@clinic.org").get("/models/oral-photo").text
    teachers = card["training"]["teachers"]
    assert f"average of the weights of {teachers['models']} teachers" in page
    assert "Soup (served), test" in page and "Student (served)" not in page
    assert f"<td>{card['metrics']['macro_auc']:.3f}</td>" in page


def test_the_result_leads_with_the_risk_and_uses_the_models_own_words(app_client: TestClient) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    thyroid = Path(__file__).parents[2] / "samples" / "thyroid-us" / "ddti_10_1.jpg"
    data = {"model_id": "thyroid-us", "patient_ref": "T-1", "csrf_token": browser.cookies["oncolens_csrf"]}
    page = browser.post("/analyze", data=data, files=[("files", ("nodule.jpg", thyroid.read_bytes(), "image/jpeg"))])
    assert page.status_code == 200, page.text
    result = page.text[page.text.index('id="result-title"') :]
    assert result.index('data-testid="risk-level"') < result.index('data-testid="statement"')
    statement = result[result.index('data-testid="statement"') :]
    assert statement.index("Risk level ") < statement.index("Most likely class:")
    assert "P(suspicious)" in result and "P(malignant)" not in result
    assert ">suspicious</em>" in result and ">malignant</em>" not in result
    skin = analyze(browser).text  # type: ignore[attr-defined]
    assert "P(malignant)" in skin and ">malignant</em>" in skin


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"patient_ref": "R" * 129}, "Patient reference: String should have at most 128 characters"),
        ({"patient_ref": "", "patient_name": ""}, "A case needs a patient reference"),
        ({"patient_age": "131"}, "Age: Input should be less than or equal to 130"),
        ({"patient_sex": "robot"}, "Sex: Input should be"),
        ({"clinical_notes": "n" * 10_001}, "Clinical notes: String should have at most 10000 characters"),
    ],
)
def test_a_bad_patient_field_is_a_message_on_the_form_never_cut(
    app_client: TestClient, fields: dict[str, str], message: str
) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    before = case_count(app_client)
    page = analyze(browser, **fields)
    assert page.status_code == 422  # type: ignore[attr-defined]
    assert message.replace("'", "&#39;") in page.text or message in page.text  # type: ignore[attr-defined]
    assert case_count(app_client) == before, "nothing is stored when a field is refused"


def test_a_viewer_cannot_analyse_or_review(app_client: TestClient) -> None:
    viewer = web_login(app_client, "view@clinic.org")
    page = analyze(viewer)
    assert page.status_code == 403 and "viewer" in page.text  # type: ignore[attr-defined]


def analysed_case(client: TestClient) -> tuple[TestClient, Case]:
    """A clinician's web session and the case it just made on the analyze page."""
    browser = web_login(client, "doc@clinic.org")
    analyze(browser)
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        case = session.exec(select(Case).order_by(col(Case.created_at).desc())).first()
    assert case is not None
    return browser, case


def test_an_invalid_review_is_shown_and_not_saved(app_client: TestClient) -> None:
    browser, case = analysed_case(app_client)
    token = browser.cookies["oncolens_csrf"]
    bad = browser.post(f"/cases/{case.id}/review", data={"status": "done", "csrf_token": token})
    assert bad.status_code == 400 and "The review was not saved: status: Input should be" in bad.text
    good = browser.post(
        f"/cases/{case.id}/review",
        data={"status": "reviewed", "confirmed_diagnosis": "melanoma", "csrf_token": token},
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"].endswith("?saved=1")


# --- every read of a case or one of its images writes exactly one audit event ---------------------------

READS = [
    ("api", "/api/v1/cases/{case}", "view"),
    ("api", "/api/v1/cases/{case}/images/{image}", "image_view"),
    ("api", "/api/v1/cases/{case}/report.pdf", "report"),
    ("api", "/api/v1/cases/{case}/fhir", "fhir_export"),
    ("web", "/cases/{case}", "view"),
    ("web", "/cases/{case}/images/{image}", "image_view"),
    ("web", "/cases/{case}/images/{image}/heatmap.png", "heatmap_view"),
    ("web", "/cases/{case}/report.pdf", "report"),
    ("api", "/api/v1/result/results/{case}", "view"),  # the oral compat app (an oral-photo case)
]


@pytest.fixture(scope="module")
def stored(app_client: TestClient) -> dict[str, dict[str, str]]:
    """One skin case (API) and one oral case (compat route), with an image id each."""
    headers = login(app_client, "doc@clinic.org")
    skin = app_client.post(
        "/api/v1/cases",
        data={"model_id": "skin-ham10000", "patient_ref": "AUDIT"},
        files=[("files", ("a.jpg", SAMPLE.read_bytes(), "image/jpeg"))],
        headers=headers,
    ).json()
    oral_image = next((Path(__file__).parents[2] / "samples" / "oral-photo").glob("*.jpg")).read_bytes()
    oral = app_client.post(
        "/api/v1/result/results/", data={"name": "Audit"}, files={"files": ("o.jpg", oral_image)}, headers=headers
    ).json()
    oral_case = app_client.get(f"/api/v1/cases/{oral['id']}", headers=headers).json()
    return {
        "skin": {"case": skin["id"], "image": skin["images"][0]["id"]},
        "oral": {"case": oral_case["id"], "image": oral_case["images"][0]["id"]},
    }


def events(client: TestClient) -> list[AuditEvent]:
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        return list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))))


@pytest.mark.parametrize(("edge", "template", "action"), READS)
def test_every_read_route_writes_exactly_one_audit_event(
    app_client: TestClient, stored: dict[str, dict[str, str]], edge: str, template: str, action: str
) -> None:
    ids = stored["oral" if "result/results" in template else "skin"]
    url = template.format(**ids)
    if edge == "web":
        reader = web_login(app_client, "doc@clinic.org")
    else:
        reader = TestClient(app_client.app, headers=login(app_client, "doc@clinic.org"))
    start = len(events(app_client))  # after the login, which writes its own event
    response = reader.get(url)
    assert response.status_code == 200, response.text
    new = events(app_client)[start:]
    assert [(e.action, e.case_id) for e in new] == [(action, ids["case"])], f"{url}: {[e.action for e in new]}"
    assert new[0].actor == "doc@clinic.org"


def test_tables_speak_the_clinicians_words_and_a_case_can_be_exported_and_deleted(app_client: TestClient) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    page = analyze(browser, patient_ref="DEL-1")
    case_id = re.search(r'data-testid="case-link">([0-9a-f]{32})<', page.text).group(1)  # type: ignore[union-attr, attr-defined]
    listing = browser.get("/cases?patient_ref=DEL-1").text
    row = listing[listing.index(f"/cases/{case_id}") :]
    row = row[: row.index("</tr>")]
    assert "pending review" in row and "pending_review" not in row
    names = {c["id"]: c["name"] for c in json.loads(CARD.read_text())["classes"]}
    assert any(f"<td>{name}</td>" in row for name in names.values()), row
    case_page = browser.get(f"/cases/{case_id}").text
    assert f'<code title="{case_id}">{case_id[:8]}</code>' in case_page and 'data-testid="fhir"' in case_page
    fhir = browser.get(f"/cases/{case_id}/fhir.json")
    assert fhir.headers["content-type"] == "application/fhir+json"
    assert fhir.json()["resourceType"] == "Bundle" and "attachment" in fhir.headers["content-disposition"]
    token = browser.cookies["oncolens_csrf"]
    unconfirmed = browser.post(f"/cases/{case_id}/delete", data={"csrf_token": token})
    assert unconfirmed.status_code == 400 and "Tick the box to confirm the deletion." in unconfirmed.text
    viewer = web_login(app_client, "view@clinic.org")
    refused = viewer.post(
        f"/cases/{case_id}/delete", data={"csrf_token": viewer.cookies["oncolens_csrf"], "confirm": "yes"}
    )
    assert refused.status_code == 403 and "cannot delete cases" in refused.text
    done = browser.post(
        f"/cases/{case_id}/delete", data={"csrf_token": token, "confirm": "yes"}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"] == "/cases?deleted=1"
    assert browser.get(f"/cases/{case_id}").status_code == 404
    assert "Case deleted." in browser.get("/cases?deleted=1").text
    models = browser.get("/models").text
    assert 'data-testid="headline-skin-ham10000"' in models and "non-commercial</span>" in models


def test_audit_details_read_as_words_not_python_lists(app_client: TestClient) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    case_id = re.search(r'data-testid="case-link">([0-9a-f]{32})<', analyze(browser).text).group(1)  # type: ignore[union-attr, attr-defined]
    token = browser.cookies["oncolens_csrf"]
    browser.post(f"/cases/{case_id}/review", data={"csrf_token": token, "status": "reviewed", "review_notes": "ok"})
    with Session(app_client.app.state.engine) as session:  # type: ignore[attr-defined]
        details = [e.detail for e in session.exec(select(AuditEvent).where(AuditEvent.case_id == case_id))]
    review = next(d for d in details if "status reviewed" in d)
    assert "[" not in review and review.startswith("web: ")


def test_an_error_among_several_images_names_the_image(app_client: TestClient) -> None:
    browser = web_login(app_client, "doc@clinic.org")
    data = {"model_id": "skin-ham10000", "patient_ref": "M-2", "csrf_token": browser.cookies["oncolens_csrf"]}
    files = [
        ("files", ("first.jpg", SAMPLE.read_bytes(), "image/jpeg")),
        ("files", ("second.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "image/jpeg")),
    ]
    page = browser.post("/analyze", data=data, files=files)
    assert page.status_code in (400, 415, 422)
    assert "Image 2 (second.jpg): " in page.text


def test_no_logged_in_page_refers_to_another_host(app_client: TestClient) -> None:
    external = re.compile(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)
    browser = web_login(app_client, "doc@clinic.org")
    case_id = re.search(r'data-testid="case-link">([0-9a-f]{32})<', analyze(browser).text).group(1)  # type: ignore[union-attr, attr-defined]
    for path in ("/analyze", "/cases", f"/cases/{case_id}", "/models", "/models/breast-us", "/account"):
        page = browser.get(path)
        assert page.status_code == 200, path
        assert not external.search(page.text), f"{path} refers to another host"


def test_the_review_form_records_a_reference_and_the_admin_model_pages_work(app_client: TestClient) -> None:
    browser, case = analysed_case(app_client)
    token = browser.cookies["oncolens_csrf"]
    page = browser.get(f"/cases/{case.id}")
    assert '<option value="mel" >Melanoma (mel)</option>' in page.text and "histopathology" in page.text
    form = {"status": "confirmed", "reference_class": "mel", "reference_standard": "", "csrf_token": token}
    missing = browser.post(f"/cases/{case.id}/review", data=form)
    assert missing.status_code == 400 and "reference_standard: needed with a reference_class" in missing.text
    form |= {"reference_standard": "histopathology", "reference_date": "2026-12-01"}
    saved = browser.post(f"/cases/{case.id}/review", data=form)
    assert saved.status_code == 200
    shown = re.sub(r"\s+", " ", browser.get(f"/cases/{case.id}").text)
    assert "Reference: <strong>Melanoma</strong> (histopathology, 2026-12-01)" in shown
    cleared = browser.post(f"/cases/{case.id}/review", data=form | {"reference_class": ""})
    assert cleared.status_code == 200 and "Reference: <strong>" not in cleared.text
    # The model pages are the admin's; a clinician is refused.
    assert browser.get("/admin/models").status_code == 403
    add_user(app_client, "boss@clinic.org", "admin")
    admin = web_login(app_client, "boss@clinic.org")
    listing = admin.get("/admin/models")
    assert listing.status_code == 200 and 'data-testid="model-row-skin-ham10000"' in listing.text
    model = admin.get("/admin/models/skin-ham10000?period=week")
    assert model.status_code == 200 and 'data-testid="version-1.4.0"' in model.text and "serves" in model.text
    token = admin.cookies["oncolens_csrf"]
    refused = admin.post("/admin/models/skin-ham10000/rollback", data={"why": "test", "csrf_token": token})
    assert refused.status_code == 422 and "nothing to roll back to" in refused.text


def test_the_case_list_pages_older_by_cursor(app_client: TestClient) -> None:
    from datetime import timedelta

    from oncolens.store.db.models import new_id

    browser, case = analysed_case(app_client)
    with Session(app_client.app.state.engine) as session:  # type: ignore[attr-defined]
        for i in range(1, 26):  # 25 older copies of the case
            session.add(
                Case.model_validate(
                    case.model_dump() | {"id": new_id(), "created_at": case.created_at - timedelta(minutes=i)}
                )
            )
        session.commit()
        mine = len(session.exec(select(Case).where(Case.owner_id == case.owner_id)).all())
    first = browser.get("/cases")
    older = re.search(r'<a href="([^"]+)" rel="next">Older', first.text)
    assert older is not None and "cursor=" in older.group(1)
    shown_first = set(re.findall(r'href="/cases/([0-9a-f]{32})"', first.text))
    second = browser.get(older.group(1).replace("&amp;", "&"))
    shown_second = set(re.findall(r'href="/cases/([0-9a-f]{32})"', second.text))
    assert len(shown_first) == 20 and shown_first.isdisjoint(shown_second) and "page 2 of" in second.text
    assert len(shown_first | shown_second) == min(mine, 40)
    stale = browser.get("/cases?page=2&cursor=bm90LWEtY3Vyc29y")
    assert stale.status_code == 200 and "That page link is not valid any more" in stale.text
    far = browser.get("/cases?page=999")
    assert far.status_code == 200 and re.search(r"page (\d+) of \1", far.text)


def test_the_audit_trail_pages_older_by_cursor_with_its_kept_total(app_client: TestClient) -> None:
    from oncolens.services.audit import audit

    engine = app_client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        for i in range(60):
            audit(session, None, "report", f"case-{i}", f"audit paging {i}")
        session.commit()
        total = len(session.exec(select(AuditEvent).where(AuditEvent.action == "report")).all())
    add_user(app_client, "auditor@clinic.org", "admin")
    admin = web_login(app_client, "auditor@clinic.org")
    first = admin.get("/admin/audit?action=report")
    assert f"{total} events" in first.text
    older = re.search(r'<a href="([^"]+)" rel="next">Older', first.text)
    assert older is not None and "cursor=" in older.group(1) and "Newer" not in first.text
    second = admin.get(older.group(1).replace("&amp;", "&"))
    ids = [re.findall(r"audit paging (\d+)<", page.text) for page in (first, second)]
    assert len(ids[0]) == 50 and set(ids[0]).isdisjoint(ids[1]) and "page 2 of" in second.text
    assert 'rel="prev">Newer' in second.text
    stale = admin.get("/admin/audit?page=2&cursor=bm90LWEtY3Vyc29y")
    assert stale.status_code == 200 and "That page link is not valid any more" in stale.text
