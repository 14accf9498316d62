"""The case use cases every edge calls: create, list, get, review, update, delete a case; open a
stored image, explain it, build the case's PDF report or FHIR bundle.

Each call that reads or changes a case writes its own audit event, so no edge can forget one. A
case of another clinician is reported as not found (its existence is not disclosed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import numpy as np
from PIL import Image
from sqlalchemy import delete, func, or_, tuple_
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from oncolens.config import Settings
from oncolens.decision import DISCLAIMER, CaseResult, ImageResult
from oncolens.errors import Gone, InvalidInput, NotFound, PermissionDenied, Unavailable
from oncolens.services.analysis import Analysed, Recorder, Runner, analyse, analyse_now, case_result_of
from oncolens.services.audit import Actor, audit_by, commit_read_audit
from oncolens.services.inputs import CaseReview, PatientInput, validated
from oncolens.services.paging import decode_cursor, encode_cursor, not_a_cursor
from oncolens.store import stats
from oncolens.store.db.models import Case, CaseImage, Role, User, utcnow
from oncolens.store.images import BROWSER_IMAGE_TYPES, MEDIA_TYPES, ImageStore, StoreError, require_space
from oncolens.store.views import CasePublic, as_utc
from oncolens.vision.cam import Explanation, display_image, explanation, png_bytes
from oncolens.vision.decode import DecodedImage, decode_image
from oncolens.vision.prepare import RawImage
from oncolens.zoo import ModelNotFound, ModelPackage, Zoo
from oncolens.zoo.preprocess import preprocess

log = logging.getLogger("oncolens.cases")

REFERENCE_FIELDS = ("reference_class", "reference_standard", "reference_date")
# The case list's order, newest first; (created_at, id) is also the keyset of its cursor.
NEWEST_FIRST = (col(Case.created_at).desc(), col(Case.id).desc())


@dataclass(frozen=True)
class CaseFilters:
    """Narrowing of a case list; None (or empty) leaves a filter out."""

    model_id: str | None = None
    risk_level: str | None = None
    status: str | None = None
    patient_ref: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None


@dataclass(frozen=True)
class StoredFile:
    """An image ready to send: the stored bytes, or rendered ones (DICOM/TIFF shown as PNG)."""

    media_type: str
    content: bytes


def can_write(user: User) -> bool:
    """Admins and clinicians create and change cases; viewers only read."""
    return user.role in (Role.admin.value, Role.clinician.value)


def require_writer(user: User) -> None:
    if not can_write(user):
        raise PermissionDenied(f"this needs the admin or clinician role; you are {user.role}")


def visible(query: SelectOfScalar[Case], user: User) -> SelectOfScalar[Case]:
    """Clinicians see their own cases and the department's (made by the DICOM listener from a study);
    admins and viewers see all."""
    if user.role != Role.clinician:
        return query
    return query.where(or_(col(Case.owner_id) == user.id, col(Case.dicom_study_uid).is_not(None)))


FRAME_NAME = re.compile(r"#frame(\d+)\.dcm$")  # an image the DICOM listener took from a multi-frame instance


def frame_of(filename: str) -> int | None:
    """The frame number (from 1) in a name ``<SOP UID>#frame<n>.dcm``, else None."""
    found = FRAME_NAME.search(filename or "")
    return int(found.group(1)) if found else None


def may_see(user: User, case: Case) -> bool:
    """``visible`` for one case."""
    return user.role != Role.clinician or case.owner_id == user.id or case.dicom_study_uid is not None


class CaseService:
    """Cases in one database session and one image store."""

    def __init__(self, session: Session, store: ImageStore, zoo: Zoo, settings: Settings) -> None:
        self.session, self.store, self.zoo, self.settings = session, store, zoo, settings

    # --- reading ---------------------------------------------------------------------------------------

    def find(self, user: User, case_id: str, model_id: str | None = None) -> Case:
        """The case if ``user`` may see it (and, given ``model_id``, it was made by that model); no audit."""
        case = self.session.get(Case, case_id)
        if case is None or not may_see(user, case):
            raise NotFound(f"no case {case_id}")
        if model_id is not None and case.model_id != model_id:
            raise NotFound(f"no case {case_id} of model {model_id}")
        return case

    def images_of(self, case: Case) -> list[CaseImage]:
        rows = self.session.exec(select(CaseImage).where(CaseImage.case_id == case.id))
        return sorted(rows, key=lambda image: image.position)

    def view(self, case: Case) -> CasePublic:
        """How the case reads (no audit: the caller has audited the read or just made the change)."""
        return CasePublic.of(case, self.images_of(case), DISCLAIMER)

    def get(self, actor: Actor, case_id: str, model_id: str | None = None) -> Case:
        """Open a case to read it: audited ``view``."""
        case = self.find(actor.user, case_id, model_id)
        self._commit_audit(actor, "view", case.id)
        return case

    def query(self, user: User, filters: CaseFilters) -> SelectOfScalar[Case]:
        """The select() of the cases ``user`` may see, narrowed by ``filters``."""
        query = visible(select(Case), user)
        if filters.model_id:
            query = query.where(Case.model_id == filters.model_id)
        if filters.risk_level:
            query = query.where(Case.risk_level == filters.risk_level)
        if filters.status:
            query = query.where(Case.status == filters.status)
        if filters.patient_ref:
            query = query.where(Case.patient_ref == filters.patient_ref)
        if filters.created_from:
            query = query.where(col(Case.created_at) >= filters.created_from)
        if filters.created_to:
            query = query.where(col(Case.created_at) < filters.created_to)
        return query

    def page(self, user: User, filters: CaseFilters, limit: int, offset: int) -> tuple[list[Case], int]:
        """One page of the cases ``user`` may see, newest first, and how many match in all."""
        query = self.query(user, filters)
        page = query.order_by(*NEWEST_FIRST).offset(offset).limit(limit)
        return list(self.session.exec(page).all()), self.total(user, filters, query)

    def total(self, user: User, filters: CaseFilters, query: SelectOfScalar[Case]) -> int:
        """How many cases match: from the counts kept with every write (store.stats) where the filters are
        among theirs (model, risk level, status; all cases visible), else counted."""
        if self.total_is_maintained(user, filters):
            return stats.total(self.session, filters.model_id, filters.risk_level, filters.status)
        return int(self.session.exec(select(func.count()).select_from(query.subquery())).one())

    @staticmethod
    def total_is_maintained(user: User, filters: CaseFilters) -> bool:
        """Whether ``total`` reads the kept counts (filters among theirs, every case visible) or counts."""
        return user.role != Role.clinician and not (filters.patient_ref or filters.created_from or filters.created_to)

    def page_after(
        self, user: User, filters: CaseFilters, limit: int, cursor: str | None
    ) -> tuple[list[Case], int, str | None]:
        """The page after ``cursor`` (None: the first page), how many match in all, and the next cursor
        (None on the last page). Keyset pagination on (created_at, id), newest first: a deep page costs
        what the first does, and cases made meanwhile neither repeat nor hide older ones."""
        query = self.query(user, filters)
        total = self.total(user, filters, query)
        if cursor is not None:
            when, case_id = decode_cursor("cases", cursor, 2)
            try:
                moment = as_utc(datetime.fromisoformat(str(when)))
            except ValueError:
                raise not_a_cursor("cases") from None
            query = query.where(tuple_(col(Case.created_at), col(Case.id)) < tuple_(moment, str(case_id)))
        rows = list(self.session.exec(query.order_by(*NEWEST_FIRST).limit(limit + 1)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, total, next_case_cursor(rows[-1]) if more and rows else None

    # --- creating and changing -------------------------------------------------------------------------

    async def create(
        self,
        actor: Actor,
        model: ModelPackage,
        raw: list[RawImage],
        patient_fields: Mapping[str, Any],
        runner: Runner,
        record: Recorder | None = None,
    ) -> Case:
        """Check the patient fields, analyse the images and store the case atomically (files, rows,
        audit ``create``)."""
        require_writer(actor.user)
        require_space(self.settings.data_dir, self.settings.min_free_mb)
        patient = validated(PatientInput, dict(patient_fields))
        analysed = await analyse(model, raw, self.settings, runner, record)
        answer = await anyio.to_thread.run_sync(self._shadow, model, analysed)
        return await anyio.to_thread.run_sync(self._store, actor, analysed, raw, patient, answer)

    def create_now(
        self, actor: Actor, model: ModelPackage, raw: list[RawImage], patient_fields: Mapping[str, Any], study_uid: str
    ) -> Case:
        """``create`` for a caller without an event loop (the DICOM listener), analysed on this thread;
        the case keeps the DICOM study it came from."""
        require_writer(actor.user)
        require_space(self.settings.data_dir, self.settings.min_free_mb)
        patient = validated(PatientInput, dict(patient_fields))
        analysed = analyse_now(model, raw, self.settings)
        return self._store(actor, analysed, raw, patient, self._shadow(model, analysed), study_uid)

    def _shadow(self, model: ModelPackage, analysed: Analysed) -> tuple[str, str] | None:
        """The shadow version's answer to the same images, where one shadows ``model``."""
        shadow = self.zoo.shadow_of(model.id)
        if shadow is None or shadow.version == model.version:
            return None
        return shadow_answer(shadow, analysed)

    def _store(
        self,
        actor: Actor,
        analysed: Analysed,
        raw: list[RawImage],
        patient: PatientInput,
        shadow: tuple[str, str] | None = None,
        study_uid: str | None = None,
    ) -> Case:
        """Write the image files, then commit the case, its images and the audit event; all or nothing."""
        result = analysed.result
        written: list[str] = []
        # No database connection waits on the image store: the reads of this request end here (the
        # session hands its connection back to the pool and takes one again for the commit below).
        self.session.close()
        try:
            for image, decoded in zip(raw, analysed.prepared.decoded, strict=True):
                written.append(self.store.write(image.data, decoded.format))
            case = _case_row(actor.user, result, patient)
            if shadow is not None:
                case.shadow_version, case.shadow_result_json = shadow
            case.dicom_study_uid = study_uid
            self.session.add(case)
            rows = [
                _image_row(case.id, image, decoded, stored, image_result)
                for image, decoded, stored, image_result in zip(
                    raw, analysed.prepared.decoded, written, result.images, strict=True
                )
            ]
            self.session.add_all(rows)
            stats.bump(self.session, case, +1)
            stats.bump_monitor(self.session, case, [row.result_json for row in rows], +1)
            detail = f"{result.model_id}: {len(raw)} image(s), risk {result.aggregate.risk_level}"
            audit_by(self.session, actor, "create", case.id, detail)
            self.session.commit()
        except BaseException:
            self.session.rollback()
            self.store.remove(written)
            raise
        return case

    def review(self, actor: Actor, case_id: str, changes: Mapping[str, Any], model_id: str | None = None) -> Case:
        """The clinician review (status, confirmed diagnosis, notes), stamped with who and when."""
        case = self.find(actor.user, case_id, model_id)
        require_writer(actor.user)
        review = validated(CaseReview, dict(changes))
        fields = review.model_dump(exclude_unset=True)
        if not fields:
            raise InvalidInput(
                "nothing to update: send status, confirmed_diagnosis, review_notes, reference_class, "
                "reference_standard or reference_date"
            )
        now = utcnow()
        fields = self._reference(case, fields, now)
        if fields.get("status", case.status) != case.status:  # the dashboard's counts move with it
            stats.bump(self.session, case, -1)
            stats.bump(self.session, case, +1, status=fields["status"])
        moved = fields.get("reference_class", case.reference_class) != case.reference_class
        images = stats.image_results(self.session, case.id) if moved else []
        if moved:  # and the monitoring counts with a new reference class
            stats.bump_monitor(self.session, case, images, -1)
        for field, value in fields.items():
            setattr(case, field, value)
        if moved:
            stats.bump_monitor(self.session, case, images, +1)
        case.reviewed_by, case.reviewed_at = actor.user.id, now
        case.updated_at = case.reviewed_at
        audit_by(
            self.session,
            actor,
            "review",
            case.id,
            f"{', '.join(sorted(fields))}; status {case.status.replace('_', ' ')}",
        )
        self.session.add(case)
        self.session.commit()
        return case

    def _reference(self, case: Case, fields: dict[str, Any], now: datetime) -> dict[str, Any]:
        """The review's reference fields checked as a whole: the class is one of the case's model's
        class ids and comes with a standard; the date defaults to the review's; null clears all three."""
        if "reference_class" in fields and fields["reference_class"] is None:
            return fields | {"reference_standard": None, "reference_date": None}
        merged = {name: fields.get(name, getattr(case, name)) for name in REFERENCE_FIELDS}
        if not any(name in fields for name in REFERENCE_FIELDS):
            return fields
        if merged["reference_class"] is None:
            raise InvalidInput("reference_standard and reference_date need a reference_class")
        model = self.installed_model(case.model_id)
        if model is None:
            raise InvalidInput(f"the case's model {case.model_id} is not installed, so its class ids cannot be checked")
        if merged["reference_class"] not in model.card.class_ids:
            raise InvalidInput(
                f"reference_class: {merged['reference_class']!r} is not a class of {case.model_id}; "
                f"one of {', '.join(model.card.class_ids)}"
            )
        if merged["reference_standard"] is None:
            raise InvalidInput(
                "reference_standard: needed with a reference_class; one of histopathology, cytology, "
                "clinical_follow_up, expert_consensus"
            )
        if merged["reference_date"] is None:
            merged["reference_date"] = now.date()
        if merged["reference_date"] > now.date():
            raise InvalidInput(f"reference_date: {merged['reference_date']} is in the future")
        return fields | merged

    def update_patient(
        self, actor: Actor, case_id: str, changes: Mapping[str, Any], model_id: str | None = None
    ) -> Case:
        """Change the patient fields of a case; the result is checked as a whole, as at creation."""
        case = self.find(actor.user, case_id, model_id)
        require_writer(actor.user)
        current = {name: getattr(case, name) for name in PatientInput.model_fields}
        patient = validated(PatientInput, current | dict(changes))
        for name, value in patient.columns().items():
            setattr(case, name, value)
        case.updated_at = utcnow()
        audit_by(self.session, actor, "update", case.id, f"patient: {', '.join(sorted(changes))}")
        self.session.add(case)
        self.session.commit()
        return case

    def delete(self, actor: Actor, case_id: str, model_id: str | None = None) -> None:
        """Delete a case, its image rows and then its files (files go only once the rows are gone)."""
        case = self.find(actor.user, case_id, model_id)
        require_writer(actor.user)
        images = self.session.exec(
            select(CaseImage.stored_name, CaseImage.result_json).where(CaseImage.case_id == case.id)
        ).all()
        names = [name for name, _ in images]
        self.session.exec(delete(CaseImage).where(col(CaseImage.case_id) == case.id))
        audit_by(self.session, actor, "delete", case.id, f"{case.model_id} case of patient ref {case.patient_ref!r}")
        stats.bump(self.session, case, -1)
        stats.bump_monitor(self.session, case, [result for _, result in images], -1)
        self.session.delete(case)
        self.session.commit()
        try:
            self.store.remove(names)
        except StoreError as exc:  # the case is gone; its files go with the next orphan sweep
            log.warning(
                "case %s deleted; its %d file(s) wait for the orphan sweep: %s", case_id, len(names), exc.detail
            )

    # --- images, heat-maps, reports --------------------------------------------------------------------

    def _image(self, case: Case, image_id: str) -> CaseImage:
        image = self.session.get(CaseImage, image_id)
        if image is None or image.case_id != case.id:
            raise NotFound(f"case {case.id} has no image {image_id}")
        return image

    def _file(self, image: CaseImage) -> bytes:
        try:
            return self.store.read(image.stored_name)
        except FileNotFoundError:
            raise Gone(f"the file of image {image.id} is missing from storage") from None

    def _decode(self, data: bytes) -> DecodedImage:
        return decode_image(data, self.settings.max_image_bytes, self.settings.max_image_pixels)

    def open_image(self, actor: Actor, case_id: str, image_id: str, for_browser: bool = False) -> StoredFile:
        """A stored original image (audited ``image_view``); ``for_browser`` renders DICOM/TIFF as PNG."""
        case = self.find(actor.user, case_id)
        image = self._image(case, image_id)
        data = self._file(image)
        if for_browser and image.media_type not in BROWSER_IMAGE_TYPES:
            shown = display_image(self._decode(data).image)
            stored = StoredFile("image/png", png_bytes(np.asarray(shown)))
        else:
            stored = StoredFile(image.media_type, data)
        self._commit_audit(actor, "image_view", case.id, image.id)
        return stored

    def installed_model(self, model_id: str) -> ModelPackage | None:
        try:
            return self.zoo.get(model_id)
        except ModelNotFound:
            return None

    def explain_stored(self, case: Case, image: CaseImage) -> tuple[Image.Image, Explanation | None]:
        """A stored image (display size) and its heat-map; no heat-map when the case's model version
        is not the installed one. Recomputed from the stored file, which gives the analysis's own map."""
        full = self._decode(self._file(image))
        shown = display_image(full.image)
        model = self.installed_model(case.model_id)
        if model is None or model.version != case.model_version:
            return shown, None
        inputs = preprocess([full.image], model.input_spec)
        del full  # only the display copy is kept from here on
        _, features = model.run(inputs, with_features=True)
        if features is None:
            return shown, None
        named = json.loads(image.result_json)["top_class"]  # the class the stored result names
        return shown, explanation(model, shown, features[0], named, (image.width, image.height))

    def heatmap(self, actor: Actor, case_id: str, image_id: str) -> bytes:
        """The heat-map PNG of a stored image (audited ``heatmap_view``)."""
        case = self.find(actor.user, case_id)
        image = self._image(case, image_id)
        _, found = self.explain_stored(case, image)
        if found is None:
            raise NotFound(
                f"no heat-map: case {case.id} was analysed with {case.model_id} v{case.model_version}, "
                "which is not the installed version"
            )
        self._commit_audit(actor, "heatmap_view", case.id, image.id)
        return found.heatmap_png

    def report_pdf(self, actor: Actor, case_id: str) -> bytes:
        """The case's PDF report (audited ``report``)."""
        from oncolens.reports.pdf import ReportImage, build_case_pdf  # reportlab only when a report is made

        case = self.find(actor.user, case_id)
        rows = self.images_of(case)
        public = CasePublic.of(case, rows, DISCLAIMER)
        pictures, missing, no_heatmap = [], 0, False
        for row, shown in zip(rows, public.images, strict=True):
            try:
                image, ex = self.explain_stored(case, row)
            except Gone:
                missing += 1
                continue
            no_heatmap = no_heatmap or ex is None
            overlay = Image.open(io.BytesIO(ex.overlay_png)) if ex is not None else None
            pictures.append(ReportImage(row.original_filename, image, overlay, shown.result))
        notes = []
        if no_heatmap:
            notes.append(
                f"Heat-maps omitted: the case was analysed with {case.model_id} v{case.model_version}, "
                "which is not the installed version."
            )
        if missing:
            notes.append(f"{missing} image file(s) are missing from storage.")
        reviewer = self.session.get(User, case.reviewed_by) if case.reviewed_by is not None else None
        model = self.installed_model(case.model_id)
        pdf = build_case_pdf(
            public,
            pictures,
            model.card if model is not None else None,
            self.settings.clinic_name,
            reviewer=(reviewer.full_name or reviewer.email) if reviewer is not None else None,
            note=" ".join(notes) or None,
        )
        self._commit_audit(actor, "report", case.id)
        return pdf

    def dicom_sr(self, actor: Actor, case_id: str) -> bytes:
        """The case as a DICOM Comprehensive 3D SR following TID 1500 (audited ``dicom_sr``): in the
        study of its DICOM images, or in a study of its own for a case made from photos."""
        try:
            from oncolens.reports.dicom import answer_of, case_sr, patient_reference
        except ImportError:
            raise Unavailable("DICOM reports need the dicom extra: pip install 'oncolens[dicom]'") from None
        case = self.find(actor.user, case_id)
        rows = self.images_of(case)
        sources = [self.dicom_source(row) for row in rows]
        answers = [
            answer_of(
                row.original_filename or f"image {row.position + 1}",
                json.loads(row.result_json),
                source,
                frame_of(row.original_filename) if source is not None else None,
            )
            for row, source in zip(rows, sources, strict=True)
        ]
        whole = None
        if len(rows) > 1:
            whole = answer_of("case", json.loads(case.result_json) | {"risk_level": case.risk_level}, None)
        model = self.installed_model(case.model_id)
        reference = next((s for s in sources if s is not None), None) or patient_reference(
            case.id, case.patient_ref, case.patient_name, case.patient_sex, as_utc(case.created_at), case.model_id
        )
        ultrasound = reference.get("Modality") == "US" or (
            model is not None and "ultrasound" in model.card.modality.lower()
        )
        sr = case_sr(case.id, case.model_id, case.model_version, answers, whole, reference, ultrasound)
        out = io.BytesIO()
        sr.save_as(out, enforce_file_format=True)
        self._commit_audit(actor, "dicom_sr", case.id)
        return out.getvalue()

    def dicom_source(self, row: CaseImage) -> Any:
        """The header of a stored DICOM image (pixels left out), or None for other images and lost files."""
        import pydicom

        if row.media_type != MEDIA_TYPES["DICOM"]:
            return None
        with contextlib.suppress(Gone, pydicom.errors.InvalidDicomError):
            return pydicom.dcmread(io.BytesIO(self._file(row)), stop_before_pixels=True)
        return None

    def fhir_bundle(self, actor: Actor, case_id: str, base_url: str) -> dict[str, Any]:
        """The case as a FHIR R4 Bundle (audited ``fhir_export``)."""
        from oncolens.reports.fhir import case_bundle

        case = self.find(actor.user, case_id)
        model = self.installed_model(case.model_id)
        bundle = case_bundle(self.view(case), model.card if model is not None else None, base_url)
        self._commit_audit(actor, "fhir_export", case.id)
        return bundle

    def _commit_audit(self, actor: Actor, action: str, case_id: str, detail: str = "") -> None:
        commit_read_audit(self.session, actor, action, case_id, detail)


def shadow_answer(shadow: ModelPackage, analysed: Analysed) -> tuple[str, str] | None:
    """(version, combined result as JSON) of a shadow version on the images the case was analysed on.

    Nothing of it reaches what the clinician sees; a shadow that fails is logged and the case is stored
    without its answer.
    """
    prepared = analysed.prepared
    try:
        inputs = prepared.inputs
        if shadow.input_spec != analysed.result_spec:
            inputs = preprocess([d.image for d in prepared.decoded], shadow.input_spec)
        logits, features = shadow.run(inputs, with_features=True)
        result = case_result_of(shadow, prepared, logits, features)
    except Exception:
        log.exception(
            "the shadow version %s %s failed on a case; the case is stored without it", shadow.id, shadow.version
        )
        return None
    return shadow.version, json.dumps(result.aggregate.to_dict())


def next_case_cursor(case: Case) -> str:
    """The cursor of the page after ``case`` in the case list's order."""
    return encode_cursor("cases", as_utc(case.created_at).isoformat(), case.id)


def _case_row(owner: User, result: CaseResult, patient: PatientInput) -> Case:
    agg = result.aggregate
    return Case(
        owner_id=owner.id,  # type: ignore[arg-type]
        model_id=result.model_id,
        model_version=result.model_version,
        top_class=agg.top_class,
        p_malignant=agg.p_malignant,
        risk_level=agg.risk_level,
        recommendation=agg.recommendation,
        aggregation_rule=result.aggregation_rule,
        result_json=json.dumps(agg.to_dict()),
        **patient.columns(),
    )


def _image_row(case_id: str, image: RawImage, decoded: DecodedImage, stored: str, result: ImageResult) -> CaseImage:
    return CaseImage(
        case_id=case_id,
        position=result.index,
        original_filename=(image.filename or "")[:255],
        stored_name=stored,
        media_type=MEDIA_TYPES[decoded.format],
        width=decoded.width,
        height=decoded.height,
        size_bytes=len(image.data),
        sha256=hashlib.sha256(image.data).hexdigest(),
        result_json=json.dumps(result.assessment.to_dict()),
    )
