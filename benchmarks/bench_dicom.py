"""The DICOM node under load, through a real `oncolens dicom listen` process:

    python benchmarks/bench_dicom.py [--studies 100] [--associations 4] [--malformed 20]

1. ``--studies`` 3-instance ultrasound studies (made from the breast-us samples) over
   ``--associations`` parallel associations, with ``--malformed`` instances (no StudyInstanceUID)
   among them: every good instance answered success and every malformed one 0xC000, then every
   study a case and every SR (and Secondary Capture) received by a destination SCP.
2. SIGKILL of the listener after the first two instances of a study; restarted, it finishes the
   study with all three.

Prints the counts and times; writes benchmarks/results/dicom.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

BREAST = Path(__file__).parents[1] / "samples" / "breast-us"
NAMES = ["malignant_016.jpg", "benign_009.jpg", "normal_002.jpg"]
US = "1.2.840.10008.5.1.4.1.1.6.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
PIXELS = [np.asarray(Image.open(BREAST / name).convert("RGB")) for name in NAMES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def study(number: int) -> list[Dataset]:
    study_uid, series = generate_uid(), generate_uid()
    out = []
    for i in range(3):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = US, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series, "US"
        ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = f"B-{number}", "Bench^Pat", "F", "050Y"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261201", "0900", str(number), ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber, ds.BodyPartExamined = "", 1, i + 1, "BREAST"
        ds.set_pixel_data(PIXELS[i], "RGB", 8)
        out.append(ds)
    return out


def send(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(US, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOLENS")
    assert assoc.is_established, "the listener refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


class Destination:
    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
        ae.add_supported_context(SR)

        def keep(event: Any) -> int:
            self.received.append(str(event.dataset.SOPClassUID))
            return 0

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])


def listener(env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "oncolens.cli.main", "dicom", "listen"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None and b"DICOM listener" in process.stdout.readline()
    return process


def states(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT state, count(*) FROM dicom_studies GROUP BY state")).all()
    engine.dispose()
    return {str(state): int(n) for state, n in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--malformed", type=int, default=20)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    args = parser.parse_args()
    figures: dict[str, Any] = {"studies": args.studies, "associations": args.associations}
    with tempfile.TemporaryDirectory(prefix="oncolens-dicom-bench-") as folder:
        destination = Destination()
        port = free_port()
        routes = Path(folder) / "routes.toml"
        routes.write_text('[[route]]\nmodality = "US"\nbody_part = "BREAST"\nmodel = "breast-us"\n')
        url = f"sqlite:///{folder}/db.sqlite"
        env = os.environ | {
            "ONCOLENS_DATA_DIR": folder,
            "ONCOLENS_DATABASE_URL": url,
            "ONCOLENS_SECRET_KEY": "dicom-benchmark-secret-key-0123456789-abcdefghij",
            "ONCOLENS_DICOM_PORT": str(port),
            "ONCOLENS_DICOM_HOST": "127.0.0.1",
            "ONCOLENS_DICOM_ALLOWED_AES": "SCANNER",
            "ONCOLENS_DICOM_STABLE_SECONDS": str(args.stable_seconds),
            "ONCOLENS_DICOM_ROUTES": str(routes),
            "ONCOLENS_DICOM_DESTINATIONS": f"PACS@127.0.0.1:{destination.port}",
        }
        subprocess.run(
            [sys.executable, "-m", "oncolens.cli.main", "users", "create", "--admin", "--email", "a@b.org",
             "--password-stdin"],
            input=b"benchmark password 12345\n", env=env, check=True, capture_output=True,
        )  # fmt: skip
        process = listener(env)
        try:
            made = [study(n) for n in range(args.studies)]
            broken = []
            for n in range(args.malformed):
                bad = study(10_000 + n)[0]
                del bad.StudyInstanceUID
                broken.append(bad)
            queues: list[list[Dataset]] = [[] for _ in range(args.associations)]
            for n, datasets in enumerate(made):
                queues[n % args.associations] += datasets
            for n, bad in enumerate(broken):
                queue = queues[n % args.associations]
                queue.insert((n * 7) % max(len(queue), 1), bad)
            statuses: list[int] = []
            start = time.perf_counter()

            def push(queue: list[Dataset]) -> None:
                statuses.extend(send(port, queue))

            threads = [threading.Thread(target=push, args=(q,)) for q in queues]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            figures["send_s"] = time.perf_counter() - start
            figures["statuses"] = {f"0x{code:04X}": statuses.count(code) for code in sorted(set(statuses))}
            deadline = time.perf_counter() + 60 + args.studies * 10
            while states(url).get("sent", 0) < args.studies and time.perf_counter() < deadline:
                time.sleep(1)
            figures["all_done_s"] = time.perf_counter() - start
            figures["states"] = states(url)
            figures["received_by_destination"] = {
                "sr": destination.received.count(SR),
                "secondary_captures": len(destination.received) - destination.received.count(SR),
            }
            engine = create_engine(url)
            with engine.connect() as connection:
                figures["cases"] = int(connection.execute(text("SELECT count(*) FROM cases")).scalar_one())
            engine.dispose()
            print(
                f"{args.studies} studies over {args.associations} associations with {args.malformed} malformed: "
                f"statuses {figures['statuses']}, sent in {figures['send_s']:.1f} s; "
                f"{figures['cases']} cases, states {figures['states']}, "
                f"destination got {figures['received_by_destination']} in {figures['all_done_s']:.1f} s"
            )

            cut = study(99_999)
            assert send(port, cut[:2]) == [0, 0]
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process = listener(env)
            restarted = time.perf_counter()
            assert send(port, cut[2:]) == [0]
            engine = create_engine(url)
            uid = cut[0].StudyInstanceUID
            row = None
            while time.perf_counter() - restarted < 120:
                with engine.connect() as connection:
                    row = connection.execute(
                        text("SELECT state, instances, case_id FROM dicom_studies WHERE study_uid = :u"), {"u": uid}
                    ).one_or_none()
                    if row is not None and row[0] in ("sent", "send_failed", "failed"):
                        images = connection.execute(
                            text("SELECT count(*) FROM case_images WHERE case_id = :c"), {"c": row[2]}
                        ).scalar_one()
                        break
                time.sleep(0.5)
            engine.dispose()
            assert row is not None
            figures["kill_9"] = {"state": row[0], "instances": row[1], "case_images": int(images)}
            print(f"SIGKILL after 2 of 3 instances, restart, third sent: {figures['kill_9']}")
        finally:
            process.terminate()
            process.wait(30)
            destination.server.shutdown()
    save("dicom", figures)


if __name__ == "__main__":
    main()
