from pathlib import Path

from fastapi.testclient import TestClient

from oncolens.app import create_app
from oncolens.config import Settings


def test_cors_origins_come_from_settings(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, cors_origins=["https://clinic.example"], preload_models=False))
    with TestClient(app) as client:
        allowed = client.get("/api/v1/health", headers={"Origin": "https://clinic.example"})
        other = client.get("/api/v1/health", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://clinic.example"
    assert "access-control-allow-origin" not in other.headers


def test_settings_read_environment(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ONCOLENS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ONCOLENS_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("ONCOLENS_MAX_IMAGE_BYTES", "1000")
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.max_image_bytes == 1000


def test_an_oversized_json_body_is_refused_with_413(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_image_bytes=1000, max_images_per_request=2, preload_models=False)
    with TestClient(create_app(settings)) as client:
        body = '{"image": "' + "A" * 100_000 + '"}'
        response = client.post(
            "/api/v1/models/skin-ham10000/predict", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert "the request body is larger than" in response.json()["detail"]


def test_no_page_or_docs_page_loads_anything_from_another_host(client: TestClient) -> None:
    """The API docs and the web pages work offline: every script, style, font and image is ours."""
    import re

    external = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", re.IGNORECASE)
    for path in ("/docs", "/redoc", "/login", "/forgot-password"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert not external.search(page.text), f"{path} refers to another host"
        assert "fonts.googleapis" not in page.text and "cdn.jsdelivr" not in page.text
    docs = client.get("/docs")
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text and "/docs-assets/swagger-ui.css" in docs.text
    assert "/docs-assets/redoc.standalone.js" in client.get("/redoc").text
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 500_000
    csp = docs.headers["content-security-policy"]
    assert "http" not in csp, "the docs' policy names no other host"
