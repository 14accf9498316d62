from __future__ import annotations

from fastapi import APIRouter

from oncolens import __version__
from oncolens.api.deps import ZooDep
from oncolens.api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def health(zoo: ZooDep) -> HealthPublic:
    """Liveness plus the models this server has loaded."""
    loaded = zoo.loaded_ids()
    return HealthPublic(status="ok", version=__version__, models_loaded=len(loaded), models=zoo.ids())
