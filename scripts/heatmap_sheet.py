"""Contact sheet of heat-maps for a shipped model: N test images per class, image beside overlay.

Used to review what each model looks at (the model cards report what was seen):

    python scripts/heatmap_sheet.py breast-us ../shared/datasets/breast-us --per-class 3 --out sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from oncolens.decision import probabilities
from oncolens.evaluation.datasets import open_rgb, read_manifest, select_split
from oncolens.vision.cam import explanation
from oncolens.zoo import Zoo
from oncolens.zoo.preprocess import preprocess

TILE = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_id")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=Path("heatmaps.png"))
    args = parser.parse_args()

    package = Zoo().get(args.model_id)
    samples = select_split(read_manifest(args.dataset_dir), args.split)
    chosen = []
    for class_id in package.class_ids:
        chosen += [s for s in samples if s.label == class_id][: args.per_class]
    sheet = Image.new("RGB", (TILE * 2 * args.per_class, (TILE + 28) * len(package.class_ids)), "white")
    draw = ImageDraw.Draw(sheet)
    counters: dict[str, int] = {}
    for sample in chosen:
        image = open_rgb(sample.file)
        logits, features = package.run(preprocess([image], package.input_spec), with_features=True)
        assert features is not None
        probs = probabilities(package.card, logits)[0]
        ex = explanation(package, image, features[0])
        row = package.class_ids.index(sample.label)
        col = counters.get(sample.label, 0)
        counters[sample.label] = col + 1
        x, y = col * 2 * TILE, row * (TILE + 28)
        for k, picture in enumerate((image, Image.open(__import__("io").BytesIO(ex.overlay_png)))):
            thumb = picture.convert("RGB")
            thumb.thumbnail((TILE, TILE))
            sheet.paste(thumb, (x + k * TILE, y + 28))
        top = package.class_ids[int(probs.argmax())]
        draw.text((x + 2, y + 2), f"{sample.file.name[:22]} true {sample.label[:14]}", fill="black")
        draw.text((x + 2, y + 14), f"pred {top[:14]} {probs.max():.2f}; map of {ex.class_id[:14]}", fill="black")
    sheet.save(args.out)
    print(f"wrote {args.out}: {len(chosen)} images")


if __name__ == "__main__":
    main()
