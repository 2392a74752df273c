"""Peak extra memory of MoonViT on one 1792x1792 image (128x128 = 16384 patches), bf16, CPU, no grad.

The a3b vision shape (``VisionConfig()``) with only ``--layers`` blocks (default 1): blocks run one after another
and free their activations, so the peak of one block is the peak of the tower. The figure is the rise of the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident set just
before the forward, printed against the size of a dense attention matrix over all patches (heads * N^2 * 2 bytes).
Target: a ratio below 0.1.

    python benchmarks/moonvit_memory.py [--layers 1] [--side 128]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from arguments import at_least, parser
from rss import PeakRise

from kimivl.config import VisionConfig
from kimivl.exits import run_command
from kimivl.model.moonvit import MoonViT

MIB = 1 << 20


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layers", type=at_least(1), default=1, help="encoder blocks (per-block peak is what matters)")
    ap.add_argument("--side", type=at_least(1), default=128, help="patches per side of the square image")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(VisionConfig(), num_hidden_layers=args.layers)
    model = MoonViT(config).to(torch.bfloat16).eval()
    n = args.side * args.side
    pixel_values = torch.randn(n, 3, config.patch_size, config.patch_size, dtype=torch.bfloat16)
    grid_hws = torch.tensor([[args.side, args.side]])

    start = time.perf_counter()
    with PeakRise() as rise, torch.no_grad():
        out = model(pixel_values, grid_hws)
    seconds = time.perf_counter() - start

    extra = rise.bytes
    dense = config.num_attention_heads * n * n * 2
    features = out.numel() * out.element_size()
    print(
        f"MoonViT a3b shape, {args.layers} layer(s), {args.side}x{args.side} = {n} patches, bf16, CPU, "
        f"{torch.get_num_threads()} threads, forward {seconds:.1f} s"
    )
    print(
        f"peak extra memory        {extra / MIB:10.1f} MiB"
        f"{'' if rise.exact else '  (ru_maxrss: VmHWM reset unavailable, a lower bound)'}"
    )
    print(f"dense attention matrix   {dense / MIB:10.1f} MiB  ({config.num_attention_heads} heads x {n}^2 x 2 B)")
    print(f"output features          {features / MIB:10.1f} MiB")
    print(f"peak extra / dense       {extra / dense:10.4f}  (target < 0.1)")
    print(f"peak extra / features    {extra / features:10.2f}")


if __name__ == "__main__":
    sys.exit(run_command("moonvit_memory.py", main))
