"""The PDF and FHIR builders on their own: a stored case's view in, a document out (no server)."""

import shutil
import subprocess
from datetime import UTC, datetime

import pytest
from PIL import Image

from oncolens.reports.fhir import case_bundle
from oncolens.reports.pdf import ReportImage, build_case_pdf
from oncolens.store.views import AssessmentPublic, CaseImagePublic, CasePublic, PatientPublic, ReviewPublic
from oncolens.zoo import BUILTIN_DIR, ModelPackage

ASSESSMENT = AssessmentPublic(
    top_class="cancer",
    top_class_name="Oral cancer",
    confidence=0.8,
    probabilities={"cancer": 0.8, "non_cancer": 0.2},
    p_malignant=0.8,
    is_malignant=True,
    risk_level="high",
    recommendation="Refer now.",
)


def case(reviewed: bool = False) -> CasePublic:
    when = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    image = CaseImagePublic(
        id="img1",
        position=0,
        filename="mouth.jpg",
        media_type="image/jpeg",
        width=640,
        height=480,
        size_bytes=1234,
        url="/api/v1/cases/c1/images/img1",
        result=ASSESSMENT,
    )
    return CasePublic(
        id="c1",
        owner_id=1,
        model_id="oral-photo",
        model_version="1.1.0",
        created_at=when,
        updated_at=when,
        patient=PatientPublic(ref="P-9", name="", age=70, sex="male", email="", clinical_notes="ulcer 3 weeks"),
        result=ASSESSMENT,
        aggregation_rule="max_malignant",
        review=ReviewPublic(
            status="reviewed" if reviewed else "pending_review",
            confirmed_diagnosis="SCC" if reviewed else "",
            notes="",
            reviewed_by=1 if reviewed else None,
            reviewed_at=when if reviewed else None,
        ),
        images=[image],
        disclaimer="Decision support only, not a diagnosis.",
    )


def test_fhir_bundle_without_a_card_names_classes_by_id_and_is_preliminary_until_reviewed() -> None:
    bundle = case_bundle(case(), None, "https://clinic.example/")
    report = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert report["code"]["text"] == "AI-assisted image screening: oral-photo"
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [o["code"]["text"] for o in observations] == [
        "Probability: cancer",
        "Probability: non_cancer",
        "Probability of a malignant class",
        "OncoLens risk level",
        "Age",
    ]
    media = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Media")
    assert media["content"]["url"] == "https://clinic.example/api/v1/cases/c1/images/img1"
    final = case_bundle(case(reviewed=True), None, "https://clinic.example/")["entry"][0]["resource"]
    assert final["status"] == "final" and "Clinician's confirmed diagnosis: SCC." in final["conclusion"]


def test_fhir_bundle_with_the_card_uses_its_class_names_and_title() -> None:
    card = ModelPackage.load(BUILTIN_DIR / "oral-photo").card
    bundle = case_bundle(case(), card, "http://x/")
    texts = [e["resource"]["code"]["text"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert texts[0] == f"Probability: {card.class_info('cancer').name}"  # type: ignore[union-attr]
    assert bundle["entry"][0]["resource"]["code"]["text"].endswith(card.title)


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils")
def test_pdf_holds_the_patient_the_result_the_review_and_the_model_card() -> None:
    card = ModelPackage.load(BUILTIN_DIR / "oral-photo").card
    picture = Image.new("RGB", (64, 48), (200, 40, 40))
    pdf = build_case_pdf(
        case(reviewed=True), [ReportImage("mouth.jpg", picture, None, ASSESSMENT)], card, "Clinic X", reviewer="Dr A"
    )
    text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
    for expected in (
        "Clinic X",
        "P-9",
        "ulcer 3 weeks",
        "Risk level: HIGH",
        "Refer now.",
        "no heat-map",
        "Dr A",
        "SCC",
    ):
        assert expected in text, expected
    assert card.title.split(" — ")[0][:20] in text
    assert "Decision support only" in text
    no_card = build_case_pdf(case(), [], None, "Clinic X")
    text = subprocess.run(["pdftotext", "-", "-"], input=no_card, capture_output=True, check=True).stdout.decode()
    assert "is no longer installed; its card is not available" in text
