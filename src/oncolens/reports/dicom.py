"""A case as DICOM, for the PACS viewer where the radiologist reads the study (highdicom):

- ``case_sr``: a Comprehensive 3D SR following TID 1500 (Measurement Report). Its observer is the
  model as a device and each image group names the algorithm (model id and version); per image a
  numeric P(malignant), a qualitative risk level, the named class as the finding, whether the image
  was in the model's domain and its quality warnings, with a reference to the source instance. A case
  of several images adds a group for the case's own answer.
- ``heatmap_sc``: a Secondary Capture of an image's heat-map overlay with "NOT FOR DIAGNOSIS" burned
  in, in the same study as its source, a new series.

A case made from photos (no DICOM source) gets a study of its own: its UID derives from the case id,
so every export of the case lands in the same study.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage

SCHEME = "99ONCOLENS"  # a private coding scheme for the models' own concepts
MANUFACTURER = "OncoLens"
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002
BURNED_IN = "NOT FOR DIAGNOSIS - OncoLens decision support heat-map"
YES, NO = hd.sr.CodedConcept("373066001", "SCT", "Yes"), hd.sr.CodedConcept("373067005", "SCT", "No")


@dataclass(frozen=True)
class ImageAnswer:
    """What the SR says of one image: the model's answer and the DICOM instance it came from, if any."""

    label: str
    top_class: str
    top_class_name: str
    p_malignant: float | None
    risk_level: str
    in_domain: bool | None
    quality: Sequence[tuple[str, str]]  # (code, message) of each quality warning
    source: Dataset | None
    frame: int | None = None  # the frame of a multi-frame source the image was (from 1)


def answer_of(label: str, result: dict[str, Any], source: Dataset | None, frame: int | None = None) -> ImageAnswer:
    """An image's stored result (its assessment JSON) as the SR reports it."""
    domain = result.get("domain") or {}
    return ImageAnswer(
        label=label,
        top_class=str(result.get("top_class") or ""),
        top_class_name=str(result.get("top_class_name") or result.get("top_class") or ""),
        p_malignant=result.get("p_malignant"),
        risk_level=str(result.get("risk_level") or "indeterminate"),
        in_domain=domain.get("in_domain") if isinstance(domain.get("in_domain"), bool) else None,
        quality=[(str(q.get("code", "quality")), str(q.get("message", ""))) for q in result.get("quality") or []],
        source=source,
        frame=frame,
    )


UID_NAMESPACE = uuid.UUID("9c1f3f4e-5b7a-4d0e-9a51-6f0c0e5a1c2d")  # OncoLens's own, for name-based UIDs


def uid_for(*parts: str) -> str:
    """A UID that the same parts always give: 2.25 and a name-based UUID (PS3.5 B.2), so re-exports of
    a case keep their UIDs."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}"


def patient_reference(
    case_id: str, patient_ref: str, patient_name: str, sex: str, created: datetime, model_id: str
) -> Dataset:
    """The patient and study of a case made without DICOM: a study of its own, keyed by the case id."""
    ds = Dataset()
    ds.PatientID = patient_ref[:64]
    # Free text, not family^given: one component, with the caret that says so.
    ds.PatientName = f"{patient_name.replace('^', ' ')[:63]}^" if patient_name else ""
    ds.PatientSex = {"male": "M", "female": "F", "other": "O"}.get(sex, "")
    ds.PatientBirthDate = ""
    ds.StudyInstanceUID = uid_for("oncolens-study", case_id)
    ds.StudyDate = created.strftime("%Y%m%d")
    ds.StudyTime = created.strftime("%H%M%S")
    ds.StudyID = case_id[:16]
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "OT"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid_for("oncolens-source", case_id)
    ds.SeriesInstanceUID = uid_for("oncolens-source-series", case_id)
    ds.StudyDescription = f"OncoLens {model_id}"
    return ds


def _concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value[:64], scheme_designator=SCHEME, meaning=meaning[:64] or value[:64])


def _group(
    answer: ImageAnswer, algorithm: hd.sr.AlgorithmIdentification, key: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [
        hd.sr.QualitativeEvaluation(
            _concept("risk-level", "Risk level"), _concept(answer.risk_level, answer.risk_level.replace("_", " "))
        )
    ]
    if answer.in_domain is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                _concept("in-domain", "Image within the model's domain"), YES if answer.in_domain else NO
            )
        )
    evaluations += [
        hd.sr.QualitativeEvaluation(_concept("quality-warning", "Image quality warning"), _concept(code, message))
        for code, message in answer.quality
    ]
    measurements = []
    if answer.p_malignant is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_concept("p-malignant", "Probability of malignancy"),
                value=float(answer.p_malignant),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
            )
        )
    sources = None
    if answer.source is not None and answer.frame is not None:
        uids = (str(answer.source.SOPClassUID), str(answer.source.SOPInstanceUID))
        sources = [hd.sr.SourceImageForMeasurementGroup(*uids, referenced_frame_numbers=[answer.frame])]
    elif answer.source is not None:
        sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(answer.source)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid_for("oncolens-tracking", key), identifier=answer.label[:64]
        ),
        algorithm_id=algorithm,
        finding_type=_concept(answer.top_class, answer.top_class_name) if answer.top_class else None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=sources,
    )


def case_sr(
    case_id: str,
    model_id: str,
    model_version: str,
    images: Sequence[ImageAnswer],
    case_answer: ImageAnswer | None,
    reference: Dataset,
    ultrasound: bool,
) -> Dataset:
    """The TID 1500 SR of a case; ``reference`` carries patient and study when no image has a DICOM source."""
    algorithm = hd.sr.AlgorithmIdentification(name=model_id, version=model_version, manufacturer=MANUFACTURER)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for("oncolens-device", model_id, model_version),
            name=f"OncoLens {model_id}",
            manufacturer_name=MANUFACTURER,
            model_name=model_id,
        ),
    )
    groups = [_group(answer, algorithm, f"{case_id}/{i}") for i, answer in enumerate(images)]
    if case_answer is not None:
        groups.append(_group(case_answer, algorithm, f"{case_id}/case"))
    procedure = (
        hd.sr.CodedConcept("16310003", "SCT", "Ultrasonography")
        if ultrasound
        else hd.sr.CodedConcept("363679005", "SCT", "Imaging")
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    # The evidence: each source instance once (a multi-frame source gives several images).
    unique = {str(a.source.SOPInstanceUID): a.source for a in images if a.source is not None}
    sources = [_with_patient_module(source) for source in unique.values()]
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources or [_with_patient_module(reference)],
        content=report[0],
        series_instance_uid=uid_for("oncolens-sr-series", case_id, model_version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid_for("oncolens-sr", case_id, model_version),
        instance_number=1,
        manufacturer=MANUFACTURER,
        record_evidence=bool(sources),
        is_complete=True,
        is_final=False,  # decision support, not verified by a clinician
    )
    sr.SeriesDescription = f"OncoLens {model_id} {model_version} (decision support)"[:64]
    return sr


# Type 2 attributes of the patient and study modules an SR copies from its evidence: present, if empty.
TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_patient_module(source: Dataset) -> Dataset:
    """A copy of ``source`` with every type 2 patient and study attribute present (scanners leave some out)."""
    copy = Dataset(source)
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    for name in TYPE_2:
        if name not in copy:
            setattr(copy, name, "")
    return copy


def _burn_in(overlay: Image.Image) -> np.ndarray:
    picture = overlay.convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    box = draw.textbbox((0, 0), BURNED_IN, font=font)
    draw.rectangle((0, 0, box[2] + 8, box[3] + 8), fill=(0, 0, 0))
    draw.text((4, 4), BURNED_IN, fill=(255, 255, 255), font=font)
    return np.asarray(picture, dtype=np.uint8)


def heatmap_sc(case_id: str, index: int, model_version: str, overlay: Image.Image, reference: Dataset) -> Dataset:
    """A Secondary Capture of one image's heat-map overlay, burned-in "not for diagnosis", in
    ``reference``'s study (its source instance, or the case's own study)."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_with_patient_module(reference),
        pixel_array=_burn_in(overlay),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uid_for("oncolens-sc-series", case_id, model_version),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uid_for("oncolens-sc", case_id, model_version, str(index)),
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
    )
    sc.Laterality = reference.get("Laterality", "")  # type 2C: known from the source, or empty
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "OncoLens heat-maps (not for diagnosis)"
    sc.ImageComments = BURNED_IN
    return sc
