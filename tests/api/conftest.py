from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from oncolens.app import create_app
from oncolens.config import Settings

SAMPLES = Path(__file__).parents[2] / "samples" / "skin-ham10000"
MODEL = "/api/v1/models/skin-ham10000"


def db_settings(data_dir: Path, database_url: str, **overrides: object) -> Settings:
    """Settings for an app on a test database, with a fixed JWT key."""
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        secret_key="test-secret-key-that-is-long-enough-for-hs256",
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), max_images_per_request=4)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sample_bytes() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(SAMPLES.glob("*.jpg"))}
