"""Which out-of-domain test fires, for a model's own test images and for every other dataset's.

For each model it runs the test split of each dataset folder through the served package and prints
how many images are refused as the wrong kind before the model (``analysis.check_modality``), in
domain, or flagged and by which reason: ``other_kind`` (the detector of the known other kinds gives
P(other) >= OTHER_KIND_SURE) or ``unusual`` (flagged, but not surely another kind). Large sets can
be thinned with ``--every``.

    python scripts/domain_reasons.py --datasets ../shared/datasets skin-ham10000 skin-isic9 oral-photo
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from oncolens.evaluation.datasets import open_rgb, read_manifest, select_split
from oncolens.vision.decode import WrongModality
from oncolens.vision.prepare import check_modality
from oncolens.zoo.package import ModelPackage
from oncolens.zoo.preprocess import preprocess

ZOO = Path(__file__).resolve().parents[1] / "src" / "oncolens" / "zoo"


def accepted(image: Image.Image, package: ModelPackage) -> bool:
    """Whether the server would pass the image to the model (not refused as the wrong kind)."""
    try:
        check_modality(image, package)
    except WrongModality:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--datasets", type=Path, required=True)
    parser.add_argument("--every", type=int, default=1, help="use every k-th test image of the other datasets")
    args = parser.parse_args()
    folders = sorted(p.parent for p in args.datasets.glob("*/manifest.csv"))
    for model_id in args.models:
        package = ModelPackage.load(ZOO / model_id)
        for folder in folders:
            samples = select_split(read_manifest(folder), "test")
            if folder.name != model_id:
                samples = samples[:: args.every]
            reasons: Counter[str] = Counter()
            for start in range(0, len(samples), 16):
                images = [open_rgb(s.file) for s in samples[start : start + 16]]
                kept = [im for im in images if accepted(im, package)]
                reasons["refused"] += len(images) - len(kept)
                if kept:
                    _, features = package.run(preprocess(kept, package.input_spec), with_features=True)
                    assert features is not None
                    reasons.update(c.reason or "in domain" for c in package.domain_checks(features) if c is not None)
            print(f"{model_id:<16} {folder.name:<16} {dict(reasons)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
