from collections.abc import Iterator

import pytest

from tests.seaweed import S3Server, seaweedfs


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole run (each test uses its own bucket)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
