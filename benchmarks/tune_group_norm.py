#!/usr/bin/env python
"""
Tile sizes of the fused GroupNorm + SiLU kernels (`diffusers_ssreg.fused_group_norm.TILES`), measured on your GPU.

    python benchmarks/tune_group_norm.py --output_json tune_group_norm.json

For each kind of kernel (`reduce`: the forward and backward partial sums; `pointwise`: the normalisation and the
input gradient) it times every tile in a small grid on the Flux VAE's activation shapes at batch 32 and 256 px
(bf16, channels-last, as the compiled fine-tuning step runs them), prints the effective memory bandwidth of each,
and reports the tile with the least total time. The defaults in `TILES` are the result on one NVIDIA H200
(docs/benchmarks.md, section 4); to use other values, set `diffusers_ssreg.fused_group_norm.TILES[kind]` before
training.
"""

import argparse
import itertools
import json
import time

import torch


SHAPES = "32x128x256x256,32x256x256x256,32x256x128x128,32x512x128x128,32x512x64x64,32x512x32x32"


def mean_ms(fn, calls=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="BxCxHxW,... (channels-last, bf16)")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_group_norm.py times CUDA kernels: it needs a GPU.")
    from diffusers_ssreg import fused_group_norm as fgn

    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    groups = args.groups
    inputs = []
    for shape in shapes:
        torch.manual_seed(0)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        weight = torch.randn(shape[1], device="cuda")
        _, scale, shift, mean, rstd = fgn._forward(x, weight, None, groups, 1e-6, True)
        n, c = shape[:2]
        alpha, beta, gamma = (torch.randn(n, c, device="cuda") for _ in range(3))
        inputs.append((shape, x, grad, scale, shift, mean, alpha, beta, gamma))

    # (kernel, bytes moved per element, call)
    kernels = {
        "reduce": [
            ("partial_sums", 2, lambda i: fgn._partial_sums(i[1])),
            ("grad_partial_sums", 4, lambda i: fgn._grad_partial_sums(i[2], i[1], i[3], i[4], i[5], groups, True)),
        ],
        "pointwise": [
            ("normalize", 4, lambda i: fgn._normalize(i[1], i[3], i[4], True)),
            ("grad_input", 6, lambda i: fgn._grad_input(i[2], i[1], i[3], i[4], i[5], i[6], i[7], i[8], groups, True)),
        ],
    }
    tiles = [(c, r) for c, r in itertools.product((32, 64, 128), (16, 32, 64, 128)) if 1024 <= c * r <= 8192]
    grids = {
        "reduce": [dict(block_c=c, block_l=r, num_warps=w, programs=p)
                   for (c, r), w, p in itertools.product(tiles, (4, 8), (512, 1024, 2048, 4096))],  # fmt: skip
        "pointwise": [dict(block_c=c, block_l=r, num_warps=w) for (c, r), w in itertools.product(tiles, (4, 8))],
    }
    defaults = {kind: dict(tile) for kind, tile in fgn.TILES.items()}
    rows, best = [], {}
    started = time.time()
    for kind, grid in grids.items():
        totals = []
        for tile in grid:
            fgn.TILES[kind] = tile
            total, row = 0.0, dict(kind=kind, **tile, shapes={})
            for name, nbytes, call in kernels[kind]:
                for item in inputs:
                    ms = mean_ms(lambda: call(item))
                    total += ms
                    row["shapes"][f"{name} {'x'.join(map(str, item[0]))}"] = dict(
                        ms=round(ms, 4), gb_per_s=round(nbytes * item[1].numel() / ms / 1e6, 1)
                    )
            row["total_ms"] = total
            rows.append(row)
            totals.append((total, tile))
            print(json.dumps({k: v for k, v in row.items() if k != "shapes"}), flush=True)
        fgn.TILES[kind] = defaults[kind]
        best_total, best[kind] = min(totals, key=lambda t: t[0])
        default_total = next(total for total, tile in totals if tile == defaults[kind])
        print(f"{kind}: best {best[kind]} {best_total:.2f} ms (default {default_total:.2f} ms)", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "shapes": args.shapes, "best": best, "defaults": defaults, "seconds": time.time() - started, "rows": rows}  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
