#!/usr/bin/env python
"""
Forward + backward time of the Flux VAE's building blocks at its largest activation shapes, in both memory layouts,
eager and compiled: what decides the layout and the normalisation of the compiled fine-tuning step
(docs/benchmarks.md, section 4).

    python benchmarks/bench_blocks.py --output_json bench_blocks.json

Blocks: `block` is diffusers' `ResnetBlock2D` (GroupNorm, SiLU, 3x3 convolution, twice, and the residual add),
`block_fast` the same block after `apply_training_speedups` (what the compiled fine-tuning step runs), `gns`
GroupNorm + SiLU alone (torch.nn.GroupNorm), `gns_fused` the same as one Triton kernel
(`diffusers_ssreg.fused_group_norm`), `conv` one 3x3 convolution. Each runs under bf16 autocast on a
bf16 input; the time is the mean of 10 calls after 3 warm-up calls (CUDA events).
"""

import argparse
import json
import time

import torch
from diffusers.models.resnet import ResnetBlock2D

from diffusers_ssreg.fused_group_norm import group_norm_silu
from diffusers_ssreg.speedups import apply_training_speedups


class GroupNormSiLU(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, channels, eps=1e-6)

    def forward(self, x):
        return torch.nn.functional.silu(self.norm(x))


class Conv(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class FusedGroupNormSiLU(GroupNormSiLU):
    def forward(self, x):
        return group_norm_silu(x, 32, self.norm.weight, self.norm.bias, self.norm.eps, silu=True)


def build(kind, channels):
    if kind in ("block", "block_fast"):
        block = ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=None, groups=32, eps=1e-6)
        return apply_training_speedups(block) if kind == "block_fast" else block
    return {"gns": GroupNormSiLU, "gns_fused": FusedGroupNormSiLU, "conv": Conv}[kind](channels)


def fused_error(shape):
    """Largest error of `gns_fused` (bf16 in and out) against torch's GroupNorm + SiLU in float32, per output."""
    torch.manual_seed(0)
    x = torch.randn(*shape, device="cuda").mul(2).add(1).contiguous(memory_format=torch.channels_last)
    module = GroupNormSiLU(shape[1]).cuda()
    torch.nn.init.normal_(module.norm.weight)
    torch.nn.init.normal_(module.norm.bias)
    upstream = torch.randn_like(x)
    outputs = {}
    for name, fn, dtype in (("reference", module, torch.float32), ("fused", FusedGroupNormSiLU.forward, torch.bfloat16)):
        xi = x.to(dtype).requires_grad_(True)
        y = fn(module, xi) if name == "fused" else fn(xi)
        grads = torch.autograd.grad(y, [xi, module.norm.weight, module.norm.bias], upstream.to(y.dtype))
        outputs[name] = [y.float(), *(g.float() for g in grads)]
    return {
        name: float((a - b).abs().max() / b.abs().max())
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), outputs["fused"], outputs["reference"])
    }


def mean_ms(fn, x, calls=10):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x128x256x256,32x256x128x128", help="BxCxHxW,...")
    parser.add_argument("--kinds", default="block,block_fast,gns,gns_fused,conv")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_blocks.py times CUDA kernels: it needs a GPU.")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    rows = []
    for cudnn_benchmark in (False, True):  # cuDNN autotuning matters for the convolution only
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for batch, channels, height, width in shapes:
            for kind in kinds:
                if cudnn_benchmark and kind != "conv":
                    continue
                for channels_last in (False, True):
                    for compiled in (False, True):
                        torch.manual_seed(0)
                        module = build(kind, channels).cuda()
                        x = torch.randn(batch, channels, height, width, device="cuda", dtype=torch.bfloat16)
                        if channels_last:
                            module = module.to(memory_format=torch.channels_last)
                            x = x.contiguous(memory_format=torch.channels_last)
                        x.requires_grad_(True)
                        fn = torch.compile(module) if compiled else module

                        def step(x, fn=fn, kind=kind):
                            with torch.autocast("cuda", dtype=torch.bfloat16):
                                y = fn(x, None) if kind.startswith("block") else fn(x)
                            y.backward(torch.ones_like(y))

                        started = time.time()
                        row = dict(kind=kind, shape=[batch, channels, height, width], channels_last=channels_last,
                                   compiled=compiled, cudnn_benchmark=cudnn_benchmark)  # fmt: skip
                        try:
                            row.update(ms=mean_ms(step, x), setup_s=time.time() - started)
                        except Exception as error:  # a configuration that fails is a row too
                            row.update(error=str(error)[:300])
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        del module, x, fn
                        torch.cuda.empty_cache()
    if "gns_fused" in kinds:
        for batch, channels, height, width in shapes:
            row = dict(kind="gns_fused_error", shape=[batch, channels, height, width], **fused_error((batch, channels, height, width)))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
