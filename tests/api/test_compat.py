"""The five replaced apps' documented requests, replayed against OncoLens (../shared/seeds, README Migration).

Each test sends the request exactly as the app's document shows it (curl -F fields, the Python client's
JSON) and checks the answer field by field against the document's example shape.
"""

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oncolens.app import create_app
from oncolens.config import Settings
from oncolens.zoo import BUILTIN_DIR
from tests.api.conftest import db_settings
from tests.api.test_auth_users import add_user, login

SAMPLES = Path(__file__).parents[2] / "samples"
SKIN9_NAMES = {
    "Actinic keratosis",
    "Basal cell carcinoma",
    "Benign keratosis",
    "Dermatofibroma",
    "Melanoma",
    "Melanocytic nevi",
    "Squamous cell carcinoma",
    "Vascular lesion",
}


def sample(model: str, label: str | None = None) -> tuple[str, bytes]:
    """(file name, bytes) of a committed sample image of ``model`` (with ``label`` if given)."""
    import csv

    with (SAMPLES / model / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if label is None or r["label"] == label]
    return rows[0]["file"], (SAMPLES / model / rows[0]["file"]).read_bytes()


def app_client(tmp_path: Path, **overrides: object) -> TestClient:
    settings = Settings(data_dir=tmp_path, preload_models=False, **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with app_client(tmp_path_factory.mktemp("compat")) as test_client:
        yield test_client


# --- skin 9-class app (Flask) -------------------------------------------------------------------------


def test_skin9_predict_answers_in_the_apps_shape(client: TestClient) -> None:
    # (the committed melanoma sample is one the model flags out of its domain: it would answer "Unknown")
    name, data = sample("skin-isic9", "basal_cell_carcinoma")
    # curl -X POST -F "file=@lesion.jpg" http://localhost:5001/predict
    response = client.post("/predict", files={"file": (name, data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    prediction = body["prediction"]
    assert set(prediction) == {"class_name", "is_cancerous", "confidence", "all_predictions"}
    assert set(prediction["all_predictions"]) == SKIN9_NAMES, "eight of the app's classes; never 'Unknown'"
    assert sum(prediction["all_predictions"].values()) == pytest.approx(1.0, abs=2e-3)
    assert prediction["confidence"] == max(prediction["all_predictions"].values())
    assert prediction["all_predictions"][prediction["class_name"]] == prediction["confidence"]
    # "is_cancerous" is the malignant call, a border of the risk levels: it agrees with the risk level.
    threshold = client.get("/api/v1/models/skin-isic9").json()["risk_policy"]["malignant_threshold"]
    assert prediction["is_cancerous"] is (body["oncolens"]["p_malignant"] >= threshold)
    assert body["oncolens"]["statement"].startswith(f"Risk level {body['oncolens']['risk_level']}: ")
    assert body["oncolens"]["model_id"] == "skin-isic9"
    assert body["oncolens"]["risk_level"] in {"low", "borderline", "moderate", "high"}
    assert "not a diagnosis" in body["oncolens"]["disclaimer"]
    # the same route under its own prefix gives the same answer
    again = client.post("/compat/skin9/predict", files={"file": (name, data, "image/jpeg")}).json()
    assert again["prediction"] == prediction


def test_skin9_health_and_errors(client: TestClient) -> None:
    assert client.get("/health").json() == {
        "status": "healthy",
        "model_loaded": client.get("/health").json()["model_loaded"],
    }
    client.post("/predict", files={"file": ("a.jpg", sample("skin-isic9")[1], "image/jpeg")})
    assert client.get("/health").json() == {"status": "healthy", "model_loaded": True}
    bad = client.post("/predict", files={"file": ("notes.txt", b"hello, not an image", "text/plain")})
    assert bad.status_code == 415
    assert bad.json()["success"] is False and "not an image" in bad.json()["error"].lower()
    missing = client.post("/predict", data={"file": "text"}, files={"note": ("note.txt", b"x", "text/plain")})
    assert missing.status_code == 400 and "form field 'file'" in missing.json()["error"]


# --- thyroid app (FastAPI, base64 JSON) ----------------------------------------------------------------


def encode_image(data: bytes) -> str:
    return base64.b64encode(data).decode("utf-8")


def test_thyroid_python_client_example(client: TestClient) -> None:
    _, data = sample("thyroid-us", "tirads_4_5")
    api = "/api/v1"
    response = client.post(f"{api}/predict", json={"image": encode_image(data), "filename": "thyroid_scan.jpg"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["success"] is True and result["filename"] == "thyroid_scan.jpg"
    assert len(result["timestamp"]) == 19 and result["timestamp"][4] == "-"
    prediction = result["prediction"]
    assert set(prediction) == {"class", "label", "confidence_score", "confidence_percentage"}
    assert prediction["class"] in (0, 1)
    assert prediction["label"] == (
        "TI-RADS 4-5 (suspicious)" if prediction["class"] else "TI-RADS 2-3 (not suspicious)"
    )
    score = prediction["confidence_score"]
    expected_pct = (score if prediction["class"] else 1 - score) * 100
    assert prediction["confidence_percentage"] == pytest.approx(expected_pct, abs=0.02)
    assert result["risk_assessment"] in {"Low Risk", "Borderline", "Moderate", "High Risk"}
    assert result["recommendation"]
    assert score == pytest.approx(result["oncolens"]["p_malignant"], abs=1e-4)

    analysis = client.post(
        f"{api}/analyze", json={"image": encode_image(data), "filename": "thyroid_scan.jpg", "include_gradcam": True}
    ).json()
    assert set(analysis) >= {"success", "timestamp", "filename", "prediction", "risk_assessment", "recommendation"}
    assert analysis["prediction"] == prediction
    assert analysis["gradcam"]["layer_used"] == "features"
    width, height = Image.open(io.BytesIO(data)).size
    for kind in ("original", "heatmap", "overlay"):
        png = Image.open(io.BytesIO(base64.b64decode(analysis["gradcam"]["images"][kind])))
        assert png.format == "PNG" and png.size == (width, height)
    without = client.post(f"{api}/analyze", json={"image": encode_image(data), "include_gradcam": False}).json()
    assert without["gradcam"] is None


def test_thyroid_gradcam_model_info_and_errors(client: TestClient) -> None:
    _, data = sample("thyroid-us")
    body = {"image": "data:image/jpeg;base64," + encode_image(data), "filename": "thyroid_scan.jpg", "layer_name": None}
    gradcam = client.post("/api/v1/gradcam", json=body).json()
    assert set(gradcam) >= {"success", "timestamp", "filename", "layer_used", "images", "prediction"}
    assert set(gradcam["images"]) == {"original", "heatmap", "overlay"}
    assert set(gradcam["prediction"]) == {"class", "label", "confidence_score"}
    wrong_layer = client.post("/api/v1/gradcam", json=body | {"layer_name": "depthwise_separable_conv_2"})
    assert wrong_layer.status_code == 400 and "does not exist in this model" in wrong_layer.json()["detail"]

    info = client.get("/api/v1/model-info").json()
    assert set(info) >= {"model_name", "input_shape", "output_shape", "total_parameters", "classes", "conv_layers"}
    assert info["classes"] == {"0": "TI-RADS 2-3 (not suspicious)", "1": "TI-RADS 4-5 (suspicious)"}
    assert info["input_shape"] == [None, 224, 224, 3] and info["output_shape"] == [None, 1]
    assert info["total_parameters"] > 3_000_000

    broken = client.post("/api/v1/predict", json={"image": "not base64 at all!!", "filename": "x.jpg"})
    assert broken.status_code == 400 and "base64" in broken.json()["detail"]
    assert client.post("/api/v1/predict", json={"filename": "x.jpg"}).status_code == 422
    # /api/v1/health belongs to OncoLens unless the thyroid app is chosen for the root
    assert client.get("/api/v1/health").json()["status"] == "ok"
    health = client.get("/compat/thyroid/api/v1/health").json()
    assert set(health) == {"status", "model_loaded", "timestamp", "version"} and health["status"] == "healthy"


def test_root_routes_follow_the_chosen_app(tmp_path: Path) -> None:
    with app_client(tmp_path / "t", compat_root="thyroid") as thyroid_root:
        assert set(thyroid_root.get("/api/v1/health").json()) == {"status", "model_loaded", "timestamp", "version"}
        assert thyroid_root.post("/predict", files={"file": ("a.jpg", b"x")}).status_code == 404
    with app_client(tmp_path / "c", compat_root="cervical") as cervical_root:
        name, data = sample("cervical-herlev")
        body = cervical_root.post("/predict", files={"file": (name, data, "image/jpeg")}).json()
        assert body["class_id"] and "is_abnormal" in body
        assert cervical_root.get("/api/v1/health").json()["status"] == "ok"
    with app_client(tmp_path / "n", compat_enabled=False) as plain:
        assert plain.post("/predict", files={"file": ("a.jpg", b"x")}).status_code == 404
        assert plain.post("/compat/skin9/predict", files={"file": ("a.jpg", b"x")}).status_code == 404


def test_a_missing_model_is_a_clear_503(tmp_path: Path) -> None:
    with app_client(tmp_path, compat_models="skin9=no-such-model") as other:
        response = other.post("/predict", files={"file": ("a.jpg", sample("skin-isic9")[1], "image/jpeg")})
        assert response.status_code == 503
        assert "no-such-model" in response.json()["error"] and "ONCOLENS_COMPAT_MODELS" in response.json()["error"]


# --- cervical app (Flask) ------------------------------------------------------------------------------


def test_cervical_curl_example(client: TestClient) -> None:
    name, data = sample("cervical-herlev", "carcinoma_in_situ")
    # curl -X POST -F "file=@path_to_image.jpg" http://127.0.0.1:5000/predict
    body = client.post("/compat/cervical/predict", files={"file": (name, data, "image/jpeg")}).json()
    assert set(body) == {"prediction", "class_id", "confidence", "probabilities", "is_abnormal", "oncolens"}
    assert len(body["probabilities"]) == 7 and body["probabilities"][body["prediction"]] == body["confidence"]
    abnormal = {"carcinoma_in_situ", "severe_dysplastic", "moderate_dysplastic", "light_dysplastic"}
    p_abnormal = sum(p for c, p in body["oncolens"]["probabilities"].items() if c in abnormal)
    assert body["oncolens"]["p_malignant"] == pytest.approx(p_abnormal, abs=1e-5)


# --- skin 7-class app (FastAPI + Jinja2) ---------------------------------------------------------------


def test_skin7_upload_then_predict_in_the_browser_flow(client: TestClient) -> None:
    name, data = sample("skin-ham10000")
    page = client.post("/upload-image", files={"file": (name, data, "image/jpeg")}, headers={"accept": "text/html"})
    assert page.status_code == 200 and "<img src='/uploads/" in page.text and "name='image_path'" in page.text
    image_path = page.text.split("name='image_path' value='")[1].split("'")[0]
    assert client.get(image_path).content == data
    result = client.post("/predict", data={"image_path": image_path}, headers={"accept": "text/html"})
    # skin9 owns the root /predict by default, so the 7-class flow is served under its prefix
    assert result.status_code in (400, 415)
    result = client.post("/compat/skin7/predict", data={"image_path": image_path}, headers={"accept": "text/html"})
    assert result.status_code == 200 and "Risk level" in result.text and "%" in result.text
    assert "not a diagnosis" in result.text


def test_skin7_json_fields_and_bad_paths(client: TestClient) -> None:
    name, data = sample("skin-ham10000")
    upload = client.post(
        "/compat/skin7/upload-image", files={"file": (name, data, "image/jpeg")}, headers={"accept": "application/json"}
    ).json()
    result = client.post(
        "/compat/skin7/predict", data={"image_path": upload["image_path"]}, headers={"accept": "application/json"}
    ).json()
    assert result["label"].endswith(")") and result["confidence"].endswith("%")
    assert [p["label"] for p in result["predictions"]] == ["AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"]
    top = max(result["predictions"], key=lambda p: p["confidence"])
    assert result["confidence"] == f"{top['confidence'] * 100:.2f}%"
    for bad in ("/uploads/../../etc/passwd", "/uploads/nothing.jpg"):
        response = client.post(
            "/compat/skin7/predict", data={"image_path": bad}, headers={"accept": "application/json"}
        )
        assert response.status_code == 404 and "upload it first" in response.json()["detail"]
    not_image = client.post(
        "/compat/skin7/upload-image",
        files={"file": ("x.jpg", b"GIF89a....", "image/gif")},
        headers={"accept": "text/html"},
    )
    assert not_image.status_code == 415 and "role='alert'" in not_image.text and "Traceback" not in not_image.text


# --- oral app (FastAPI + SQLModel, stored results) -----------------------------------------------------


@pytest.fixture(scope="module")
def oral(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = db_settings(tmp_path_factory.mktemp("oral"), database_url, preload_models=False)
    with TestClient(create_app(settings)) as test_client:
        add_user(test_client, "doc@clinic.org", "clinician")
        add_user(test_client, "vic@clinic.org", "viewer")
        yield test_client


def test_oral_upload_list_get_update_delete(oral: TestClient) -> None:
    doc, vic = login(oral, "doc@clinic.org"), login(oral, "vic@clinic.org")
    (n1, img1), (n2, img2) = sample("oral-photo", "cancer"), sample("oral-photo", "non_cancer")
    form = {"email": "user@example.com", "name": "John Doe", "age": "45", "gender": "Male"}
    files = [("files", (n1, img1, "image/jpeg")), ("files", (n2, img2, "image/jpeg"))]
    assert oral.post("/api/v1/result/results/", data=form, files=files).status_code == 401
    assert oral.post("/api/v1/result/results/", data=form, files=files, headers=vic).status_code == 403
    created = oral.post("/api/v1/result/results/", data=form, files=files, headers=doc)
    assert created.status_code == 200, created.text
    result = created.json()
    assert set(result) >= {"user_id", "result", "confidence", "images"}
    assert len(result["images"]) == 2
    assert oral.get(result["images"][0], headers=doc).content == img1

    # stored as an OncoLens case with the patient fields
    case = oral.get(f"/api/v1/cases/{result['id']}", headers=doc).json()
    # the answer is the model's decision: CANCER from the card's call threshold on P(malignant) (a
    # screening threshold, below 0.5), the confidence that class's calibrated probability
    threshold = json.loads((BUILTIN_DIR / "oral-photo" / "card.json").read_text())["risk_policy"]["malignant_threshold"]
    p_cancer = case["result"]["probabilities"]["cancer"]
    assert result["result"] == ("CANCER" if p_cancer >= threshold else "NON CANCER")
    top = "cancer" if result["result"] == "CANCER" else "non_cancer"
    assert result["confidence"] == pytest.approx(round(case["result"]["probabilities"][top] * 100, 2))
    assert case["model_id"] == "oral-photo" and case["patient"]["name"] == "John Doe"
    assert case["patient"]["age"] == 45 and case["patient"]["email"] == "user@example.com"
    assert case["patient"]["sex"] == "male" and len(case["images"]) == 2

    listed = oral.get("/api/v1/result/results/", headers=vic).json()
    assert [r["id"] for r in listed] == [result["id"]]
    assert oral.get(f"/api/v1/result/results/{result['id']}", headers=vic).json()["result"] == result["result"]

    updated = oral.put(f"/api/v1/result/results/{result['id']}", json={"age": 46, "result": "CANCER"}, headers=doc)
    assert updated.status_code == 200
    assert updated.json()["result"] == result["result"], "the model's output is never overwritten"
    assert updated.json()["oncolens"]["confirmed_result"] == "CANCER"
    assert updated.json()["oncolens"]["status"] == "reviewed"
    assert oral.put(f"/api/v1/result/results/{result['id']}", json={}, headers=doc).status_code == 422
    assert oral.put(f"/api/v1/result/results/{result['id']}", json={"age": 46}, headers=vic).status_code == 403

    assert oral.delete(f"/api/v1/result/results/{result['id']}", headers=doc).json() == {"ok": True, "id": result["id"]}
    assert oral.get(f"/api/v1/result/results/{result['id']}", headers=doc).status_code == 404


def test_oral_bad_input_is_a_clear_error(oral: TestClient) -> None:
    doc = login(oral, "doc@clinic.org")
    _, img = sample("oral-photo")
    url = "/api/v1/result/results/"
    before = len(oral.get(url, headers=doc).json())
    urlencoded = oral.post(url, data={"name": "A"}, headers=doc)
    assert urlencoded.status_code == 415 and "multipart/form-data" in urlencoded.json()["detail"]
    no_files = oral.post(url, data={"name": "A"}, files={"note": ("n.txt", b"x", "text/plain")}, headers=doc)
    assert no_files.status_code == 400 and "no image file in form field 'files'" in no_files.json()["detail"]
    bad_age = oral.post(url, data={"name": "A", "age": "old"}, files={"files": ("a.jpg", img)}, headers=doc)
    assert bad_age.status_code == 422 and "patient_age: Input should be a valid integer" in bad_age.json()["detail"]
    bad_gender = oral.post(url, data={"name": "A", "gender": "x"}, files={"files": ("a.jpg", img)}, headers=doc)
    assert bad_gender.status_code == 422 and "patient_sex: Input should be" in bad_gender.json()["detail"]
    long_name = oral.post(url, data={"name": "N" * 256}, files={"files": ("a.jpg", img)}, headers=doc)
    assert long_name.status_code == 422, "a name over the column's 255 characters is refused, not cut"
    assert "patient_name: String should have at most 255 characters" in long_name.json()["detail"]
    bad_image = oral.post(url, data={"name": "A"}, files={"files": ("a.jpg", b"nope")}, headers=doc)
    assert bad_image.status_code == 415
    assert len(oral.get(url, headers=doc).json()) == before, "nothing stored from a failed upload"
