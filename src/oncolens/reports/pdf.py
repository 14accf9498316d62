"""The PDF case report (reportlab): everything a clinic files about one analysed case.

Header and patient, the model and its version, each image beside its heat-map overlay with its own
result, the aggregated result with the risk level and recommendation, the clinician review, the
model's test metrics and intended use, the decision-support disclaimer and the generation time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.platypus import (
    Flowable,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)
from reportlab.platypus import (
    Image as PdfImage,
)

from oncolens.reports import reference_words
from oncolens.store.views import AssessmentPublic, CasePublic
from oncolens.zoo.card import ModelCard, RiskLevel

RISK_COLOURS = {
    RiskLevel.low: "#2e7d32",
    RiskLevel.borderline: "#b58900",
    RiskLevel.moderate: "#e65100",
    RiskLevel.high: "#c62828",
    RiskLevel.indeterminate: "#5f6368",
}


@dataclass(frozen=True)
class ReportImage:
    filename: str
    image: Image.Image
    overlay: Image.Image | None
    result: AssessmentPublic


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("title", parent=base["Title"], fontSize=16, spaceAfter=4),
        "h2": ParagraphStyle("h2", parent=base["Heading2"], fontSize=12, spaceBefore=8, spaceAfter=4),
        "body": ParagraphStyle("body", parent=base["BodyText"], fontSize=9, leading=12),
        "small": ParagraphStyle("small", parent=base["BodyText"], fontSize=7.5, leading=10, textColor="#444444"),
        "warn": ParagraphStyle(
            "warn",
            parent=base["BodyText"],
            fontSize=9,
            leading=12,
            textColor="#7a1f1f",
            backColor="#fdecea",
            borderPadding=4,
        ),
    }


def _pdf_image(image: Image.Image, max_w: float, max_h: float) -> PdfImage:
    buffer = io.BytesIO()
    thumb = image.convert("RGB")
    thumb.thumbnail((600, 600))
    thumb.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    scale = min(max_w / thumb.width, max_h / thumb.height)
    return PdfImage(buffer, width=thumb.width * scale, height=thumb.height * scale)


def _table(rows: list[list[Any]], widths: list[float], header: bool = True) -> Table:
    table = Table(rows, colWidths=widths, hAlign="LEFT")
    style = [
        ("FONTSIZE", (0, 0), (-1, -1), 8.5),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#bbbbbb")),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
    ]
    if header:
        style += [
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef5")),
            ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
        ]
    table.setStyle(TableStyle(style))
    return table


CELL_MAX_LINES = 12
CELL_MAX_CHARS = 1200


def _clip(text: str, max_lines: int = CELL_MAX_LINES, max_chars: int = CELL_MAX_CHARS) -> str:
    """A free-text field as a table cell can hold it: a row never splits across pages, so a field
    taller than a page (a pasted document as a name) is shortened, saying so; the case keeps it whole."""
    lines = text.splitlines() or [""]
    short = "\n".join(lines[:max_lines])
    if len(short) > max_chars:
        short = short[:max_chars]
    if short != text:
        short = short.rstrip() + " \u2026 (shortened here; the case record holds the whole text)"
    return short


def _cell(text: str, style: ParagraphStyle) -> Paragraph:
    """Client text in a table cell: escaped once, line breaks kept, clipped to fit a page."""
    return Paragraph(escape(_clip(text)).replace("\n", "<br/>"), style)


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metric_rows(card: ModelCard) -> list[list[str]]:
    metrics = card.metrics
    rows = [["test metric", "value", "95% interval"]]
    for key, label in (
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("macro_auc", "macro AUROC"),
        ("ece", "calibration error (ECE)"),
    ):
        if key in metrics:
            rows.append([label, _fmt(metrics[key]), _interval(metrics.get("intervals", {}).get(key))])
    malignant = metrics.get("malignant")
    if malignant:
        for key in ("sensitivity", "specificity", "auc"):
            if key in malignant:
                interval = _interval(malignant.get("intervals", {}).get(key))
                rows.append([f"malignant vs benign {key}", _fmt(malignant[key]), interval])
    return rows


def _interval(pair: list[float] | None) -> str:
    """``low - high``, or a dash where the card gives no interval."""
    return f"{_fmt(pair[0])} - {_fmt(pair[1])}" if pair else "-"


Styles = dict[str, ParagraphStyle]


def _header(case: CasePublic, clinic: str, s: Styles) -> list[Flowable]:
    return [
        Paragraph(escape(clinic), s["small"]),
        Paragraph("Image screening report", s["title"]),
        Paragraph(f"Case {escape(case.id)} &middot; analysed {case.created_at:%Y-%m-%d %H:%M} UTC", s["body"]),
        Spacer(1, 4),
        Paragraph(escape(case.disclaimer), s["warn"]),
    ]


def _patient(case: CasePublic, s: Styles) -> list[Flowable]:
    p = case.patient
    fields = [
        ("Patient reference", p.ref),
        ("Name", p.name),
        ("Age", "" if p.age is None else str(p.age)),
        ("Sex", p.sex),
        ("E-mail", p.email),
    ]
    rows: list[list[Any]] = [[k, _cell(v, s["body"])] for k, v in fields if v]
    story: list[Flowable] = [
        Paragraph("Patient", s["h2"]),
        _table(rows or [["Patient", "(no patient fields stored)"]], [4 * cm, 12 * cm], header=False),
    ]
    if p.clinical_notes:
        notes = escape(_clip(p.clinical_notes, 60, 6000)).replace("\n", "<br/>")
        story.append(Paragraph(f"<b>Clinical notes:</b> {notes}", s["body"]))
    return story


def _model(case: CasePublic, card: ModelCard | None, s: Styles) -> list[Flowable]:
    title = card.title if card else case.model_id
    modality = f" &middot; {escape(card.modality)}" if card else ""
    return [
        Paragraph("Model", s["h2"]),
        Paragraph(
            f"{escape(title)} &mdash; <b>{escape(case.model_id)}</b> version {escape(case.model_version)}{modality}",
            s["body"],
        ),
    ]


def _result(case: CasePublic, card: ModelCard | None, s: Styles) -> list[Flowable]:
    label = card.score_label if card else "P(malignant)"
    r = case.result
    colour = RISK_COLOURS.get(r.risk_level, "#000000")
    combined = (
        f" &middot; {len(case.images)} images combined by rule '{escape(case.aggregation_rule)}'"
        if len(case.images) > 1
        else ""
    )
    rows = [["class", "probability", ""]]
    for class_id, prob in sorted(r.probabilities.items(), key=lambda kv: -kv[1]):
        info = card.class_info(class_id) if card else None
        name = info.name if info else class_id
        rows.append([escape(name), f"{prob:.3f}", "malignant class" if info and info.malignant else ""])
    notices: list[Flowable] = []
    indeterminate = r.risk_level == RiskLevel.indeterminate
    if indeterminate:
        notices.append(
            Paragraph(
                "<b>No class and no risk level.</b> The probabilities below are shown for reference only and "
                "must not be acted on.",
                s["warn"],
            )
        )
    if r.note:
        notices.append(Paragraph(f"<b>Note:</b> {escape(r.note)}.", s["body"]))
    return [
        Paragraph("Result", s["h2"]),
        Paragraph(
            f"Risk level: <font color='{colour}'><b>{escape(r.risk_level.upper())}</b></font>"
            + ("" if indeterminate else f" &middot; {escape(label)} {r.p_malignant:.3f}")
            + combined,
            s["body"],
        ),
        Paragraph(escape(r.statement), s["body"]),
        *notices,
        Spacer(1, 4),
        _table(rows, [8 * cm, 3 * cm, 5 * cm]),
    ]


def _images(images: list[ReportImage], note: str | None, s: Styles, label: str = "P(malignant)") -> list[Flowable]:
    story: list[Flowable] = [Paragraph("Images", s["h2"])]
    if note:
        story.append(Paragraph(escape(note), s["small"]))
    for index, item in enumerate(images, start=1):
        res = item.result
        heat: Any = (
            _pdf_image(item.overlay, 6 * cm, 5 * cm)
            if item.overlay is not None
            else Paragraph("no heat-map", s["small"])
        )
        answer = (
            "<br/><b>indeterminate</b>: no class, no risk level"
            if res.risk_level == RiskLevel.indeterminate
            else f"<br/>{escape(res.top_class_name)} ({res.confidence:.1%})"
            f"<br/>{escape(label)} {res.p_malignant:.3f}<br/>risk: {escape(res.risk_level)}"
        )
        text = Paragraph(
            f"<b>{index}. {escape(item.filename or 'image')}</b>"
            + answer
            + "".join(f"<br/>quality: {escape(issue.message)}" for issue in res.quality),
            s["body"],
        )
        block = Table(
            [[_pdf_image(item.image, 6 * cm, 5 * cm), heat, text]],
            colWidths=[6.3 * cm, 6.3 * cm, 4.4 * cm],
            hAlign="LEFT",
        )
        block.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP")]))
        story.append(KeepTogether([block, Spacer(1, 6)]))
    story.append(
        Paragraph(
            "Each row: the image as analysed, where the model looked (class-activation heat-map of the named "
            "class), and that image's own result.",
            s["small"],
        )
    )
    return story


def _review(case: CasePublic, card: ModelCard | None, reviewer: str | None, s: Styles) -> list[Flowable]:
    review = case.review
    rows = [
        ["Status", review.status],
        ["Reviewed by", reviewer or ("" if review.reviewed_by is None else f"user {review.reviewed_by}")],
        ["Reviewed at", "" if review.reviewed_at is None else f"{review.reviewed_at:%Y-%m-%d %H:%M} UTC"],
        ["Confirmed diagnosis", review.confirmed_diagnosis],
        ["Reference", reference_words(case, card) if case.reference_class else ""],
        ["Notes", review.notes],
    ]
    # One block: the heading and the whole table move to the next page together, never split.
    return [
        KeepTogether(
            [
                Paragraph("Clinician review", s["h2"]),
                _table([[k, _cell(v or "-", s["body"])] for k, v in rows], [4 * cm, 12 * cm], header=False),
            ]
        )
    ]


def _about_model(case: CasePublic, card: ModelCard | None, s: Styles) -> list[Flowable]:
    story: list[Flowable] = [Paragraph("About the model", s["h2"])]
    if card is None:
        story.append(
            Paragraph(f"Model {escape(case.model_id)} is no longer installed; its card is not available.", s["body"])
        )
        return story
    data = card.dataset
    story += [
        Paragraph(f"<b>Intended use:</b> {escape(card.intended_use)}", s["body"]),
        Spacer(1, 4),
        _table(_metric_rows(card), [7 * cm, 3 * cm, 4 * cm]),
        Paragraph(
            f"Measured on {card.metrics.get('n')} held-out test images of {escape(data.title or data.name)}. "
            f"Data licence: {escape(data.license or 'unknown')}",
            s["small"],
        ),
    ]
    story += [Paragraph(f"&bull; {escape(limitation)}", s["small"]) for limitation in card.limitations[:4]]
    return story


def build_case_pdf(
    case: CasePublic,
    images: list[ReportImage],
    card: ModelCard | None,
    clinic: str,
    reviewer: str | None = None,
    note: str | None = None,
) -> bytes:
    """The report as PDF bytes. ``card`` is the model card (None if the model is no longer installed)."""
    s = _styles()
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    story = [
        *_header(case, clinic, s),
        *_patient(case, s),
        *_model(case, card, s),
        *_result(case, card, s),
        *_images(images, note, s, card.score_label if card else "P(malignant)"),
        *_review(case, card, reviewer, s),
        *_about_model(case, card, s),
        Spacer(1, 8),
        Paragraph(escape(case.disclaimer), s["warn"]),
        Paragraph(f"Generated {generated} by OncoLens.", s["small"]),
    ]
    return _render(story, case, clinic, generated)


def _render(story: list[Flowable], case: CasePublic, clinic: str, generated: str) -> bytes:
    buffer = io.BytesIO()

    def footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(
            1.5 * cm, 1 * cm, f"OncoLens case {case.id} - decision support, not a diagnosis - generated {generated}"
        )
        canvas.drawRightString(A4[0] - 1.5 * cm, 1 * cm, f"page {doc.page}")
        canvas.restoreState()

    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=1.5 * cm,
        rightMargin=1.5 * cm,
        topMargin=1.5 * cm,
        bottomMargin=1.6 * cm,
        title=f"OncoLens case {case.id}",
        author=clinic,
        subject="Image screening report",
    )
    doc.build(story, onFirstPage=footer, onLaterPages=footer)
    return buffer.getvalue()
