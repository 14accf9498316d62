"""The README stays short and every link in it and in the docs site resolves to a file."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def targets(markdown: Path) -> list[tuple[str, Path]]:
    return [
        (link, (markdown.parent / link).resolve())
        for link in LINK.findall(markdown.read_text())
        if not link.startswith(("http://", "https://", "mailto:"))
    ]


def test_the_readme_is_at_most_250_lines_and_its_links_resolve() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    missing = [link for link, path in targets(readme) if not path.exists()]
    assert not missing, missing
    for step in ("pip install -e .", "oncolens serve", "python -m pytest", "ONCOLENS_TEST_DATABASE_URL"):
        assert step in readme.read_text()


def test_every_docs_link_resolves() -> None:
    generated = {"reference.md", "openapi.json"} | {
        p.parent.name + ".md" for p in (ROOT / "src/oncolens/zoo").glob("*/card.json")
    }
    missing = [
        f"{page.relative_to(ROOT)}: {link}"
        for page in (ROOT / "docs").rglob("*.md")
        for link, path in targets(page)
        if not path.exists() and path.name not in generated
    ]
    assert not missing, missing
