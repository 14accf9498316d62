"""Case reports: the PDF (reportlab) and the FHIR R4 Bundle, both built from the stored case."""

from __future__ import annotations

from oncolens.store.views import CasePublic
from oncolens.zoo.card import ModelCard


def reference_words(case: CasePublic, card: ModelCard | None) -> str:
    """``Melanoma (mel; histopathology, 2026-12-01)``: the review's reference, as the PDF and FHIR say it."""
    info = card.class_info(case.reference_class) if card and case.reference_class else None
    how = (case.reference_standard or "standard not recorded").replace("_", " ")
    when = f", {case.reference_date.isoformat()}" if case.reference_date else ""
    return f"{info.name if info else case.reference_class} ({case.reference_class}; {how}{when})"
