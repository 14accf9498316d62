"""Training cost per batch on this CPU, fp32 against bf16 autocast, for the parts a recipe can put in bf16.

python benchmarks/bench_train_step.py [--batch 32] [--repeats 5] [--freeze 3,5,11]

For each ``freeze_blocks`` value, on random 224² inputs and efficientnet-lite0 with its ImageNet weights:
the frozen front alone (no gradients: what caching views and every fine-tuning step run), a training
step of the tail (forward, backward, AdamW: what every step runs), and a whole fine-tuning step with
the front in fp32 or bf16 (``front_precision``) and the tail in fp32 or bf16. The fastest of
``--repeats`` rounds of 3 after a warm-up; writes ``results/train_step.json``. bf16 pays only where
the CPU has it natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates it and it is slower.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import print_table, save

from oncolens.training.backbones import Classifier, build_backbone, frozen_front


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx_vnni")))


def fastest_ms(run: Callable[[], None], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3):
            run()
        best = min(best, (time.perf_counter() - start) / 3)
    return best * 1000


def measure(freeze: int, batch: int, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet-lite0"), 7).to(memory_format=torch.channels_last)
    for module in [model.backbone._conv_stem, model.backbone._bn0, *model.backbone._blocks[:freeze]]:
        module.eval()
        for p in module.parameters():
            p.requires_grad = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,))
    cached = frozen_front(model, x, freeze)

    def step(front: str, tail: str) -> None:
        source = cached if front == "cached" else frozen_front(model, x, freeze, front)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tail == "bf16"):
            logits = model.tail_logits(source, freeze)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    row: dict[str, object] = {"freeze_blocks": freeze}
    for precision in ("fp32", "bf16"):
        row[f"front {precision} ms"] = fastest_ms(lambda p=precision: frozen_front(model, x, freeze, p), repeats)
    for tail in ("fp32", "bf16"):
        row[f"tail step {tail} ms"] = fastest_ms(lambda t=tail: step("cached", t), repeats)
    for front, tail in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")):
        row[f"step front {front} tail {tail} ms"] = fastest_ms(lambda f=front, t=tail: step(f, t), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--freeze", default="3,5,11", help="freeze_blocks values, comma-separated")
    args = parser.parse_args()
    rows = [measure(int(f), args.batch, args.repeats) for f in args.freeze.split(",")]
    flags = cpu_flags()
    print_table(f"batch {args.batch}, {torch.get_num_threads()} threads, CPU flags {' '.join(flags) or 'none'}", rows)
    save("train_step", {"batch": args.batch, "threads": torch.get_num_threads(), "cpu_flags": flags, "rows": rows})


if __name__ == "__main__":
    main()
