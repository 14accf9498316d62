import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from oncolens.cli.main import app as cli
from oncolens.zoo.card import Decision, RiskPolicy
from tests.api.conftest import MODEL, SAMPLES

MALIGNANT = {"akiec", "bcc", "mel"}


def check_assessment(result: dict, card: dict) -> None:
    """The answer follows the card: the named class is the most probable one, the card's rebalanced
    rule shows its class as "also consider" where it differs, the risk policy picks the level, and
    the call threshold ``is_malignant``; the statement says the same."""
    probs = result["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    ids = [c["id"] for c in card["classes"]]
    assert probs[result["top_class"]] == max(probs.values())
    decision = Decision.model_validate(card.get("decision", {}))
    rebalanced = ids[int(decision.top(np.array([[probs[c] for c in ids]]))[0])]
    if rebalanced == result["top_class"]:
        assert result["also_consider"] is None
    else:
        assert result["also_consider"]["class_id"] == rebalanced
        assert result["also_consider"]["reason"] == "rare classes weighted up"
        assert f"Also consider: {result['also_consider']['name']} (rare classes weighted up)." in result["statement"]
    assert f"Most likely class: {result['top_class_name']} ({result['confidence']:.1%})" in result["statement"]
    assert result["statement"].startswith(f"Risk level {result['risk_level']}: {result['recommendation']}")
    assert result["confidence"] == pytest.approx(probs[result["top_class"]])
    assert result["p_malignant"] == pytest.approx(sum(probs[c] for c in MALIGNANT))
    policy = RiskPolicy.model_validate(card["risk_policy"])
    assert result["risk_level"] == policy.level_for(result["p_malignant"]).level
    assert result["is_malignant"] == (result["p_malignant"] >= policy.malignant_threshold)


def test_health_reports_the_loaded_models(client: TestClient) -> None:
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["version"]
    assert "skin-ham10000" in body["models"] and body["models_loaded"] >= 1


def test_models_list_and_card(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/api/v1/models").json()}
    skin = models["skin-ham10000"]
    assert [c["id"] for c in skin["classes"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert {c["id"] for c in skin["classes"] if c["malignant"]} == MALIGNANT
    assert 0.5 < skin["test_metrics"]["accuracy"]["value"] <= 1.0
    low, high = skin["test_metrics"]["accuracy"]["ci95"]
    assert low <= skin["test_metrics"]["accuracy"]["value"] <= high
    card = client.get(MODEL).json()
    # int8 answers only where the card's copy passed its gate (none has: every model serves fp32)
    assert skin["serving_precision"] == ("int8" if card["int8"]["passed"] else "fp32") == "fp32"
    # what answers, as the card says: one network, or an ensemble of k tails on one front
    for model in models.values():
        method = client.get(f"/api/v1/models/{model['id']}").json()["training"]["method"]
        assert (model["build"] == "one network") == (method != "ensemble"), model["id"]
        assert model["build"] in ("one network", *(f"ensemble of {k}" for k in range(2, 6)))
    assert "head" not in card
    assert card["calibration"]["temperature"] > 0
    assert card["metrics"]["split"] == "test"
    figure = client.get(card["figures"]["roc"])
    assert figure.status_code == 200 and figure.content.startswith(b"\x89PNG")
    assert client.get(f"{MODEL}/figures/secret.png").status_code == 404


def test_predict_one_image_multipart(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    card = client.get(MODEL).json()
    response = client.post(f"{MODEL}/predict", files={"file": ("mel.jpg", sample_bytes["ISIC_0025316.jpg"])})
    assert response.status_code == 200
    body = response.json()
    check_assessment(body, card)
    assert body["model_id"] == "skin-ham10000" and body["model_version"] == card["version"]
    assert len(body["images"]) == 1 and body["images"][0]["filename"] == "mel.jpg"
    assert body["images"][0]["probabilities"] == body["probabilities"]
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (200, 150)
    assert "not a diagnosis" in body["disclaimer"]
    assert set(body["timing_ms"]) >= {"decode", "inference", "total"}


def test_several_images_are_one_case_aggregated_by_mean(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    card = client.get(MODEL).json()
    names = ["ISIC_0025316.jpg", "ISIC_0025958.jpg", "ISIC_0026213.jpg"]
    files = [("files", (n, sample_bytes[n])) for n in names]
    body = client.post(f"{MODEL}/predict", files=files).json()
    assert [i["filename"] for i in body["images"]] == names
    for image in body["images"]:
        check_assessment(image, card)
    check_assessment(body, card)
    mean = np.mean([[i["probabilities"][c] for c in body["probabilities"]] for i in body["images"]], axis=0)
    assert list(body["probabilities"].values()) == pytest.approx(mean.tolist())


def test_json_base64_and_data_uri_give_the_multipart_result(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    data = sample_bytes["ISIC_0026213.jpg"]
    multipart = client.post(f"{MODEL}/predict", files={"file": ("x.jpg", data)}).json()
    text = base64.b64encode(data).decode()
    plain = client.post(f"{MODEL}/predict", json={"image": text, "filename": "x.jpg"}).json()
    uri = client.post(f"{MODEL}/predict", json={"image": "data:image/jpeg;base64," + text}).json()
    for body in (plain, uri):
        assert body["probabilities"] == pytest.approx(multipart["probabilities"], abs=1e-9)


def test_explain_returns_heatmaps_of_the_input_size(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    data = sample_bytes["ISIC_0025316.jpg"]
    top = client.post(f"{MODEL}/predict", files={"file": ("x.jpg", data)}).json()["top_class"]
    body = client.post(f"{MODEL}/explain", files={"file": ("x.jpg", data)}).json()
    heat = body["heatmaps"][0]
    assert heat["class_id"] == top
    for key in ("heatmap_png_base64", "overlay_png_base64"):
        image = Image.open(io.BytesIO(base64.b64decode(heat[key])))
        assert image.format == "PNG" and image.size == (200, 150)
    chosen = client.post(f"{MODEL}/explain?class=vasc", files={"file": ("x.jpg", data)}).json()
    assert chosen["heatmaps"][0]["class_id"] == "vasc"
    assert chosen["heatmaps"][0]["overlay_png_base64"] != heat["overlay_png_base64"]


def test_analyze_adds_class_descriptions_and_optional_heatmaps(
    client: TestClient, sample_bytes: dict[str, bytes]
) -> None:
    data = sample_bytes["ISIC_0028558.jpg"]
    body = client.post(f"{MODEL}/analyze", files={"file": ("x.jpg", data)}).json()
    check_assessment(body, client.get(MODEL).json())
    assert {c["id"] for c in body["classes"]} >= MALIGNANT
    assert all(c["description"] for c in body["classes"])
    assert body["intended_use"] and body["limitations"]
    assert body["images"][0]["heatmap"]["class_id"] == body["images"][0]["top_class"]
    plain = client.post(f"{MODEL}/analyze?heatmap=false", files={"file": ("x.jpg", data)}).json()
    assert plain["images"][0]["heatmap"] is None
    assert plain["probabilities"] == pytest.approx(body["probabilities"])


def png_of(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"", 400, "the image is empty"),
        (b"patient,age\nx,40\n", 415, "not an image"),
        (png_of((64, 64))[:60], 400, "truncated or corrupt"),
        (b"GIF89a" + bytes(64), 415, "GIF images are not supported"),
        (png_of((10000, 5000), "1"), 413, "over the 40 MP limit"),
    ],
)
def test_bad_images_get_their_status_and_message(client: TestClient, payload: bytes, status: int, message: str) -> None:
    response = client.post(f"{MODEL}/predict", files={"file": ("scan.png", payload, "image/png")})
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_request_errors_are_explained(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    data = sample_bytes["ISIC_0025316.jpg"]
    cases = [
        (client.post("/api/v1/models/lungs/predict", files={"file": ("x.jpg", data)}), 404, "no model 'lungs'"),
        (client.post(f"{MODEL}/predict", content=b"x", headers={"content-type": "text/plain"}), 415, "content type"),
        (client.post(f"{MODEL}/predict", files={"other": ("x.jpg", data)}), 400, "no image in the request"),
        (client.post(f"{MODEL}/predict", json={"image": "%%%"}), 400, "not valid base64"),
        (client.post(f"{MODEL}/predict", json={"picture": "abc"}), 400, "no image in the request"),
        (client.post(f"{MODEL}/explain?class=melanoma", files={"file": ("x.jpg", data)}), 400, "unknown class"),
        (client.post(f"{MODEL}/predict", files=[("files", ("x.jpg", data))] * 5), 413, "at most 4 per request"),
        (client.post(f"{MODEL}/predict", files=[("files", ("x.jpg", data))] * 9), 413, "at most 4 per request"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]


def test_second_bad_image_is_named(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    files = [("files", ("good.jpg", sample_bytes["ISIC_0025316.jpg"])), ("files", ("notes.txt", b"hello"))]
    response = client.post(f"{MODEL}/predict", files=files)
    assert response.status_code == 415
    assert response.json()["detail"].startswith("image 2 (notes.txt): ")


def test_cli_predict_matches_the_api(client: TestClient, sample_bytes: dict[str, bytes]) -> None:
    path = SAMPLES / "ISIC_0031735.jpg"
    api = client.post(f"{MODEL}/predict", files={"file": (path.name, path.read_bytes())}).json()
    result = CliRunner().invoke(cli, ["predict", str(path), "--model", "skin-ham10000", "--json"])
    assert result.exit_code == 0, result.output
    local = json.loads(result.output)
    assert local["probabilities"] == pytest.approx(api["probabilities"], abs=1e-6)
    assert local["risk_level"] == api["risk_level"]
    table = CliRunner().invoke(cli, ["predict", str(path), "--model", "skin-ham10000"])
    assert api["top_class"] in table.output and "not a diagnosis" in table.output


def test_openapi_documents_both_body_types(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/models/{model_id}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_an_image_of_the_wrong_kind_is_refused_with_what_is_wrong(client: TestClient) -> None:
    samples = Path(__file__).parents[2] / "samples"
    skin = (samples / "skin-ham10000" / "ISIC_0025316.jpg").read_bytes()
    thyroid = (samples / "thyroid-us" / "ddti_10_1.jpg").read_bytes()
    photo_to_ultrasound = client.post("/api/v1/models/thyroid-us/predict", files={"file": ("a.jpg", skin)})
    assert photo_to_ultrasound.status_code == 422
    assert "looks like a colour photograph" in photo_to_ultrasound.json()["detail"]
    assert "not an ultrasound image" in photo_to_ultrasound.json()["detail"]
    ultrasound_to_skin = client.post("/api/v1/models/skin-ham10000/predict", files={"file": ("b.jpg", thyroid)})
    assert ultrasound_to_skin.status_code == 422
    assert "greyscale image with no colour at all" in ultrasound_to_skin.json()["detail"]
    # an ultrasound frame with a Doppler colour box (a tenth of the frame) is still an ultrasound frame
    frame = np.asarray(Image.open(io.BytesIO(thyroid)).convert("RGB")).copy()
    h, w = frame.shape[:2]
    frame[: h // 3, : w // 3] = (200, 30, 30)
    doppler = io.BytesIO()
    Image.fromarray(frame).save(doppler, format="PNG")
    ok = client.post("/api/v1/models/thyroid-us/predict", files={"file": ("c.png", doppler.getvalue())})
    assert ok.status_code == 200, ok.text
