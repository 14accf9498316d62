"""The model zoo: packages shipped under ``oncolens/zoo/<model-id>/`` plus optional extra folders."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

from oncolens.config import Settings
from oncolens.zoo.package import CARD, ModelPackage, PackageError

BUILTIN_DIR = Path(__file__).parent

__all__ = [
    "BUILTIN_DIR",
    "ONE_NETWORK",
    "ModelNotFound",
    "ModelPackage",
    "PackageError",
    "Zoo",
    "discover",
    "one_network_build",
]


class ModelNotFound(KeyError):
    """No package with the requested model id."""

    def __init__(self, model_id: str, known: Iterable[str]) -> None:
        self.model_id = model_id
        self.known = sorted(known)
        super().__init__(model_id)

    def __str__(self) -> str:
        return f"no model {self.model_id!r}; available: {', '.join(self.known) or 'none'}"


# An ensemble package keeps the one-network build it replaced in this sub-folder (a whole package):
# ``ONCOLENS_ONE_NETWORK`` serves it instead, and ``oncolens models`` lists both.
ONE_NETWORK = "one-network"


def one_network_build(package_dir: Path) -> Path | None:
    """The one-network build kept inside an ensemble package, if it has one."""
    folder = package_dir / ONE_NETWORK
    return folder if (folder / CARD).is_file() else None


def discover(directories: Iterable[Path], one_network: Iterable[str] = ()) -> dict[str, Path]:
    """Model id (the card's ``id``) -> package directory for every ``*/card.json`` in the folders.

    A later folder's package replaces an earlier one with the same id (an extra folder can
    override a built-in model). A card that cannot be read is skipped here and reported when
    the model is loaded by its folder name. For the ids in ``one_network`` (or every id, with
    ``all``) a package's one-network build, where it keeps one, is chosen instead of the package.
    """
    chosen = set(one_network)
    found: dict[str, Path] = {}
    for directory in directories:
        if directory.is_dir():
            for card in sorted(directory.glob(f"*/{CARD}")):
                try:
                    model_id = str(json.loads(card.read_text(encoding="utf-8"))["id"])
                except (OSError, ValueError, KeyError, TypeError):
                    model_id = card.parent.name
                single = one_network_build(card.parent)
                found[model_id] = single if single is not None and ({model_id, "all"} & chosen) else card.parent
    return found


class Zoo:
    """Discovers packages once and loads each on first use (or all at start with ``load_all``)."""

    def __init__(
        self,
        directories: Iterable[Path] = (BUILTIN_DIR,),
        threads: int = 0,
        precision: str = "int8",
        spinning: bool = False,
        one_network: Iterable[str] = (),
    ) -> None:
        self.paths = discover(directories, one_network)
        self.shipped = dict(self.paths)  # what the folders hold; ``serve`` may put an installed version in place
        self.shadows: dict[str, ModelPackage] = {}
        self.threads = threads
        self.precision = precision
        self.spinning = spinning
        self._loaded: dict[str, ModelPackage] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, extra_dirs: Iterable[Path] = ()) -> Zoo:
        """The one way every entry point builds its zoo: the built-in packages, then
        ``ONCOLENS_EXTRA_MODEL_DIR``, then ``extra_dirs`` (a later folder overrides an earlier one)."""
        dirs = [BUILTIN_DIR] + ([settings.extra_model_dir] if settings.extra_model_dir else []) + list(extra_dirs)
        return cls(
            dirs,
            threads=settings.threads,
            precision=settings.precision,
            spinning=settings.spinning,
            one_network=settings.one_network,
        )

    def ids(self) -> list[str]:
        return sorted(self.paths)

    def get(self, model_id: str) -> ModelPackage:
        if model_id not in self.paths:
            raise ModelNotFound(model_id, self.paths)
        with self._lock:
            if model_id not in self._loaded:
                self._loaded[model_id] = ModelPackage.load(
                    self.paths[model_id], self.threads, self.precision, self.spinning
                )
            return self._loaded[model_id]

    def load_folder(self, directory: Path) -> ModelPackage:
        """A package from any folder, with this zoo's session settings (not registered)."""
        return ModelPackage.load(directory, self.threads, self.precision, self.spinning)

    def shipped_version(self, model_id: str) -> str:
        """The version of the package the folders hold for ``model_id``."""
        if model_id not in self.shipped:
            raise ModelNotFound(model_id, self.shipped)
        try:
            return str(json.loads((self.shipped[model_id] / CARD).read_text(encoding="utf-8"))["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"the card of {model_id} cannot be read: {exc}") from exc

    def serve(self, model_id: str, directory: Path | None) -> ModelPackage:
        """Answer ``model_id`` with the package in ``directory`` (None: the shipped one) from now on.

        The new package is loaded before it replaces the old one, so requests never wait for it and a
        package that fails to load changes nothing.
        """
        if model_id not in self.shipped:
            raise ModelNotFound(model_id, self.shipped)
        target = directory if directory is not None else self.shipped[model_id]
        current = self._loaded.get(model_id)
        if current is not None and self.paths[model_id] == target:
            return current
        package = self.load_folder(target)
        with self._lock:
            self.paths[model_id] = target
            self._loaded[model_id] = package
        return package

    def set_shadow(self, model_id: str, package: ModelPackage | None) -> None:
        """The version that also runs on every new case of ``model_id`` (never shown), or none."""
        if package is None:
            self.shadows.pop(model_id, None)
        else:
            self.shadows[model_id] = package

    def shadow_of(self, model_id: str) -> ModelPackage | None:
        return self.shadows.get(model_id)

    def loaded(self, model_id: str) -> ModelPackage | None:
        """The package if it is already loaded (no lock, no file read: safe on an event loop), else None."""
        return self._loaded.get(model_id)

    def loaded_ids(self) -> list[str]:
        return sorted(self._loaded)

    def load_all(self) -> list[ModelPackage]:
        return [self.get(model_id) for model_id in self.ids()]
