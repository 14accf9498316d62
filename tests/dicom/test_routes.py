"""Routing rules: the example file loads; the first route whose given keys all match wins, case-insensitive
where the issue says so; a bad file is refused with a message naming the route and the problem."""

from pathlib import Path

import pytest

from oncolens.dicom.routes import StudyHeaders, load_routes, route
from oncolens.services.studies import chosen_frames

EXAMPLE = Path(__file__).parents[2] / "deploy" / "dicom" / "routes.toml"
MODELS = ["breast-us", "thyroid-us", "skin-ham10000"]


def headers(modality: str = "US", body: str = "", description: str = "", ae: str = "SCANNER") -> StudyHeaders:
    return StudyHeaders(modality, body, description, ae)


def test_the_example_routes_breast_and_thyroid_ultrasound() -> None:
    routes = load_routes(EXAMPLE, MODELS)
    assert route(routes, headers(body="breast")).model == "breast-us"  # type: ignore[union-attr]
    assert route(routes, headers(body="THYROID")).model == "thyroid-us"  # type: ignore[union-attr]
    assert route(routes, headers(description="Left Thyroid lobe")).model == "thyroid-us"  # type: ignore[union-attr]
    assert route(routes, headers(modality="CT", body="BREAST")) is None
    assert route(routes, headers(body="ABDOMEN")) is None


def test_calling_ae_and_first_match_wins(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[route]]\ncalling_ae = "DERM"\nmodel = "skin-ham10000"\n\n[[route]]\nmodel = "breast-us"\n')
    routes = load_routes(path, MODELS)
    assert route(routes, headers(ae="DERM")).model == "skin-ham10000"  # type: ignore[union-attr]
    assert route(routes, headers(ae="OTHER")).model == "breast-us"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[route]]\nmodel = "lung-ct"\n', "route 1 names model 'lung-ct'"),
        ('[[route]]\nmodel = "breast-us"\nbodypart = "X"\n', "route 1 has unknown keys bodypart"),
        ('[[route]]\nmodel = "breast-us"\nframes = "some"\n', "route 1: frames is all, first, middle"),
        ('[[route]]\nmodel = "breast-us"\nframes = [0]\n', "route 1: frames is all, first, middle"),
        ('[[route]]\nmodel = "breast-us"\nmodality = 3\n', "are strings"),
        ("[[route]\n", "cannot read the routes"),
    ],
)
def test_a_bad_routes_file_is_refused_with_its_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_routes(path, MODELS)


def test_frame_selections() -> None:
    assert chosen_frames("all", 4) == [0, 1, 2, 3]
    assert chosen_frames("first", 4) == [0] and chosen_frames("middle", 5) == [2]
    assert chosen_frames((1, 3, 9), 4) == [0, 2]
