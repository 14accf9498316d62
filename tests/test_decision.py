"""One decision, stated once (issue 39): the floors, over every shipped model and the committed samples."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.decision import RARE_CLASSES, decide, probability_columns
from oncolens.vision.domain import OTHER_KIND, UNUSUAL, DomainCheck
from oncolens.zoo.card import RiskLevel, read_card
from scripts.check_contradictions import normalised, problems_of
from tests.api.test_auth_users import add_user, login
from tests.web.test_pages import web_login

ROOT = Path(__file__).parents[1]
ZOO = ROOT / "src" / "oncolens" / "zoo"
MODELS = sorted(p.parent.name for p in ZOO.glob("*/card.json"))
SAMPLES = {m: sorted((ROOT / "samples" / m).glob("*.jpg")) for m in MODELS}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), secret_key="decision-key-long-enough-for-hs256-x")
    with TestClient(create_app(settings)) as client:
        add_user(client, "doc@clinic.org", "clinician")
        yield client


@pytest.mark.parametrize("model", MODELS)
def test_every_card_has_the_call_as_a_border_and_no_level_narrower_than_005(model: str) -> None:
    card = read_card(ZOO / model / "card.json")
    policy = card.risk_policy
    assert policy.malignant_threshold in policy.borders
    starts = [level.min for level in policy.levels]
    widths = [b - a for a, b in zip(starts, [*starts[1:], 1.0], strict=True)]
    assert min(widths) >= 0.05 or "narrower than" in policy.reasoning
    words = policy.plain_words()
    assert all(words) and all("of 100" in w for w in words)
    assert all(level.basis for level in policy.levels)
    assert "argmax" in card.metrics and card.metrics["rule"]


@pytest.mark.parametrize("model", MODELS)
def test_no_sample_answer_contradicts_itself_through_the_api(site: TestClient, model: str) -> None:
    card = site.get(f"/api/v1/models/{model}").json()
    assert SAMPLES[model]
    for path in SAMPLES[model]:
        body = site.post(f"/api/v1/models/{model}/predict", files={"file": (path.name, path.read_bytes())}).json()
        image = body["images"][0]
        assert problems_of(image, card) == [], path.name
        assert problems_of(body, card) == [] or body["risk_level"] == "indeterminate", path.name
        assert (body["top_class"], body["risk_level"], body["statement"]) == (
            image["top_class"],
            image["risk_level"],
            image["statement"],
        )


@pytest.mark.parametrize("model", ["skin-ham10000", "thyroid-us"])
def test_the_web_page_the_pdf_and_fhir_repeat_the_apis_statement(site: TestClient, model: str) -> None:
    headers = login(site, "doc@clinic.org")
    path = SAMPLES[model][0]
    case = site.post(
        "/api/v1/cases",
        data={"model_id": model, "patient_ref": "S-1"},
        files={"files": (path.name, path.read_bytes())},
        headers=headers,
    ).json()
    statement = case["result"]["statement"]
    assert statement and statement == case["images"][0]["result"]["statement"]
    page = web_login(site, "doc@clinic.org").get(f"/cases/{case['id']}").text
    assert normalised(statement) in normalised(page)
    fhir = site.get(f"/api/v1/cases/{case['id']}/fhir", headers=headers).json()
    conclusion = next(
        e["resource"]["conclusion"] for e in fhir["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert conclusion.startswith(statement)
    if shutil.which("pdftotext"):
        pdf = site.get(f"/api/v1/cases/{case['id']}/report.pdf", headers=headers).content
        text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True).stdout.decode()
        assert normalised(statement) in normalised(text)


def test_the_named_class_is_the_arg_max_and_the_rebalanced_class_is_only_also_considered() -> None:
    card = read_card(ZOO / "skin-ham10000" / "card.json")
    ids = card.class_ids
    rng = np.random.default_rng(1)
    seen_also = 0
    for _ in range(500):  # generated probability vectors, many near the rebalanced rule's border
        probs = rng.dirichlet(np.full(len(ids), 0.7))
        a = decide(card, probs)
        assert a.top_class == ids[int(np.argmax(probs))] and a.confidence == pytest.approx(probs.max())
        assert a.risk_level == card.risk_policy.level_for(a.p_malignant).level
        assert a.recommendation == card.risk_policy.level_for(a.p_malignant).recommendation
        assert a.statement.startswith(f"Risk level {a.risk_level.value}: {a.recommendation} Most likely class:")
        if a.also_consider:
            seen_also += 1
            assert a.also_consider["class_id"] != a.top_class and a.also_consider["reason"] == RARE_CLASSES
            assert a.also_consider["probability"] < a.confidence
            assert "Most likely class: " + a.also_consider["name"] not in a.statement
    assert seen_also > 0


def test_an_indeterminate_answer_names_no_class_and_says_which_test_fired() -> None:
    card = read_card(ZOO / "skin-isic9" / "card.json")
    probs = np.full(len(card.classes), 0.01)
    probs[0] = 1 - probs[1:].sum()
    other = decide(card, probs, DomainCheck(False, 3.0, 1.0, OTHER_KIND))
    unusual = decide(card, probs, DomainCheck(False, 1.2, 1.0, UNUSUAL))
    for a in (other, unusual):
        assert a.risk_level == RiskLevel.indeterminate and not a.is_malignant and a.also_consider is None
        assert a.statement == a.recommendation and a.top_class_name not in a.statement
    assert "Choose the model for this kind of image" in other.statement
    assert "Retake it (centred, in focus, without the dermoscope's black vignette)" in unusual.statement
    assert "or judge the lesion clinically" in unusual.statement and "Choose the model" not in unusual.statement


def test_a_class_named_like_a_summary_column_gets_its_own_column_name() -> None:
    assert probability_columns(["benign", "malignant", "normal"]) == {
        "benign": "p_benign",
        "malignant": "p_class_malignant",
        "normal": "p_normal",
    }


@pytest.mark.parametrize("model", MODELS)
def test_the_heat_map_is_drawn_for_the_class_the_result_names(site: TestClient, model: str) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in SAMPLES[model][:2]]
    body = site.post(f"/api/v1/models/{model}/analyze", files=files).json()
    assert [i["heatmap"]["class_id"] for i in body["images"]] == [i["top_class"] for i in body["images"]]


@pytest.mark.parametrize("count", [1, 3])
def test_a_predict_passes_through_the_decision_module_once(
    site: TestClient, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """Calibration runs once on the request's logits, each image is decided once, the case once; the
    answer's probabilities are exactly what the decision module computed (no second copy elsewhere)."""
    from oncolens import decision

    calls: dict[str, list[object]] = {"case_result": [], "probabilities": [], "decide": []}
    for name in calls:
        real = getattr(decision, name)

        def counted(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> object:
            result = _real(*args, **kwargs)  # type: ignore[operator]
            calls[_name].append(result)
            return result

        monkeypatch.setattr(decision, name, counted)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in SAMPLES["skin-ham10000"][:count]]
    answer = site.post("/api/v1/models/skin-ham10000/predict", files=files)
    assert answer.status_code == 200, answer.text
    assert len(calls["case_result"]) == 1 and len(calls["probabilities"]) == 1
    assert len(calls["decide"]) == count + 1  # each image once, the combined result once
    shown = [image["probabilities"] for image in answer.json()["images"]]
    calibrated = calls["probabilities"][0]
    assert np.asarray(calibrated).shape == (count, 7)
    for row, image in zip(np.asarray(calibrated), shown, strict=True):
        assert np.allclose(row, list(image.values()), atol=1e-6)
