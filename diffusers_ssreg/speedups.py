"""
Faster training of a diffusers autoencoder, with the same weights, the same state-dict keys and the same results up
to floating-point rounding.

`apply_training_speedups(vae)` swaps three of diffusers' building blocks, in place, for equivalents that are
faster in a compiled training step (docs/benchmarks.md has the measurements); `remove_training_speedups(vae)` puts
the stock ones back, so the model saved after training is a stock diffusers model either way:

- **GroupNorm from per-channel statistics** (`group_norm_from_channel_stats`): the mean and variance of each
  group are combined from the mean and variance of each of its channels (the law of total variance; exact for
  groups of equal size). Every reduction is then over the spatial positions of one channel, which the compiler
  turns into fast kernels in both memory layouts; the per-group reduction of `torch.nn.GroupNorm`, in the
  channels-last layout, reads memory in strides of the channel count and runs at half the speed (one NVIDIA H200).
- **Nearest 2x upsampling as a broadcast** (`NearestUpsample2D`): its backward becomes a sum over each 2x2
  block instead of the scatter (`index_put`) that `F.interpolate`'s backward runs.
- **Attention by two matrix products** (diffusers' own `AttnProcessor`): the VAE's mid-block attention has one
  head of width 512 over 1024 positions at 256 px, which the fused attention kernels of torch do not cover at
  full speed (head widths above 256 fall back to the memory-efficient kernel); the score matrix is small.
- **GroupNorm and SiLU as one Triton kernel** (`fused_group_norm`, CUDA only; `diffusers_ssreg.fused_group_norm`):
  every GroupNorm runs as kernels that read the channels-last layout in order, and where a SiLU follows it (the
  `ResnetBlock2D`s, the encoder's and decoder's output norm) the SiLU is computed in the same pass: the module's
  `nonlinearity` (or `conv_act`) becomes an `Identity` while the swap is on. Elsewhere `group_norm` applies.
- **`ResnetBlock2D` without the layout copy** (`resnet_layout`): in training mode diffusers' block copies its input
  to the NCHW layout before its 1x1 shortcut convolution (to quiet a DDP warning about gradient strides); in a
  channels-last step that is a copy of the block's input, and two more in the convolution's backward.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from .fused_group_norm import group_norm_silu, triton_group_norm_available


__all__ = [
    "FusedGroupNorm",
    "GroupNormFromChannelStats",
    "NearestUpsample2D",
    "ResnetBlock2DWithoutCopy",
    "apply_training_speedups",
    "group_norm_from_channel_stats",
    "parse_speedups",
    "remove_training_speedups",
    "SPEEDUPS",
]

SPEEDUPS = ("fused_group_norm", "group_norm", "upsample", "attention", "resnet_layout")
_SAVED_PROCESSOR = "_attention_processor_before_speedups"
_SAVED_ACTIVATION = "_activation_before_speedups"


def group_norm_from_channel_stats(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    r"""
    `F.group_norm(x, num_groups, weight, bias, eps)`, computed from per-channel statistics.

    The group's mean is the mean of its channels' means, and its (biased) variance is the mean of its channels'
    variances plus the variance of its channels' means. Statistics are taken in float32 (or `x.dtype` when wider). The output is float32
    under CUDA autocast (as autocast runs `group_norm` there) and `x.dtype` otherwise.
    """
    n, c = x.shape[:2]
    if x.ndim < 3 or c % num_groups:
        return F.group_norm(x, num_groups, weight, bias, eps)
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32 statistics for half-precision input
    xf = x.to(dtype)
    var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.ndim)), correction=0)
    mean_c = mean_c.view(n, num_groups, c // num_groups)
    var_c = var_c.view(n, num_groups, c // num_groups)
    mean = mean_c.mean(-1, keepdim=True)
    var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    scale = rstd.expand_as(mean_c)
    shift = -mean * rstd
    if weight is not None:
        w = weight.to(dtype).view(1, num_groups, c // num_groups)
        scale = scale * w
        shift = shift * w
    if bias is not None:
        shift = shift + bias.to(dtype).view(1, num_groups, c // num_groups)
    shape = (n, c) + (1,) * (x.ndim - 2)
    out = xf * scale.reshape(shape) + shift.expand_as(mean_c).reshape(shape)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return out  # CUDA autocast runs group_norm in float32 and returns float32
    return out.to(x.dtype)


class GroupNormFromChannelStats(torch.nn.GroupNorm):
    """
    `torch.nn.GroupNorm` with the same parameters, computed by `group_norm_from_channel_stats` inside
    `torch.compile` (eager code keeps torch's fused GroupNorm kernel, which is the faster one there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm_from_channel_stats(x, self.num_groups, self.weight, self.bias, self.eps)


class FusedGroupNorm(GroupNormFromChannelStats):
    """
    `torch.nn.GroupNorm` with the same parameters, run by the Triton kernels of `diffusers_ssreg.fused_group_norm`
    on CUDA tensors, followed by SiLU in the same kernel when `fused_silu` is set (the module that applied the SiLU
    after it is then an `Identity`). Without Triton or on the CPU it is `GroupNormFromChannelStats`, then SiLU.
    The output keeps the input's dtype (torch's GroupNorm under CUDA autocast returns float32; every VAE GroupNorm
    feeds a convolution or a linear layer that casts to the autocast dtype anyway).
    """

    fused_silu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_group_norm_available(x):
            return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.fused_silu)
        out = super().forward(x)
        return F.silu(out) if self.fused_silu else out


class ResnetBlock2DWithoutCopy(ResnetBlock2D):
    """
    diffusers' `ResnetBlock2D` that keeps its input's memory layout for the shortcut convolution (diffusers copies it
    to NCHW in training mode). The same computation; a block with a time embedding or a resampler runs diffusers'
    forward.
    """

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None, *args, **kwargs):
        if (
            temb is not None or args or kwargs or self.upsample is not None or self.downsample is not None
            or self.time_embedding_norm != "default"
        ):  # fmt: skip
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        hidden_states = self.nonlinearity(self.norm2(hidden_states))
        hidden_states = self.conv2(self.dropout(hidden_states))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


class NearestUpsample2D(Upsample2D):
    """
    diffusers' `Upsample2D` with `interpolate=True` (nearest, factor 2, then its convolution), upsampling by a
    broadcast: the same values, and a backward that sums each 2x2 block. A channels-last input is broadcast in its
    own (N, H, W, C) order, so the output and the gradient of the input stay channels-last (a gradient in the
    other layout would make every convolution backward of the block before it copy its inputs).
    """

    def forward(self, hidden_states: torch.Tensor, output_size: Optional[int] = None, *args, **kwargs):
        if output_size is not None or args or kwargs or hidden_states.ndim != 4:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        n, c, h, w = hidden_states.shape
        if hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous():
            nhwc = hidden_states.permute(0, 2, 3, 1)
            up = nhwc[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        else:
            up = hidden_states[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        if self.use_conv:
            return self.conv(up) if self.name == "conv" else self.Conv2d_0(up)
        return up


def parse_speedups(text: str) -> tuple:
    """`"group_norm, attention"` -> `("group_norm", "attention")`; `"none"` or `""` -> `()`. For argparse `type=`."""
    import argparse

    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in SPEEDUPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown speed-up {', '.join(map(repr, unknown))} in {text!r}; allowed: a comma-separated list of "
            f"{', '.join(SPEEDUPS)}, or 'none'."
        )
    return tuple(dict.fromkeys(names))


def _plain_nearest_upsample(module: torch.nn.Module) -> bool:
    return (
        type(module) is Upsample2D
        and module.interpolate
        and not module.use_conv_transpose
        and module.norm is None
    )


def _norm_then_silu_pairs(module: torch.nn.Module):
    """(norm name, activation name) of `module`'s GroupNorm-then-SiLU pairs that run only in that order."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder

    if isinstance(module, ResnetBlock2D) and module.time_emb_proj is None:
        return [("norm1", "nonlinearity"), ("norm2", "nonlinearity")]
    if isinstance(module, (Encoder, Decoder)):
        return [("conv_norm_out", "conv_act")]
    return []


def _fuse_silu(module: torch.nn.Module) -> None:
    pairs = _norm_then_silu_pairs(module)
    norms = [getattr(module, norm, None) for norm, _ in pairs]
    activations = {getattr(module, act, None) for _, act in pairs}
    if not pairs or hasattr(module, _SAVED_ACTIVATION) or len(activations) != 1:
        return
    activation = activations.pop()
    plain = (torch.nn.GroupNorm, GroupNormFromChannelStats)
    if type(activation) is not torch.nn.SiLU or not all(type(norm) in plain for norm in norms):
        return
    for norm in norms:
        norm.__class__ = FusedGroupNorm
        norm.fused_silu = True
    # (a plain attribute, not a submodule: the state dict stays the same; SiLU has no parameters)
    object.__setattr__(module, _SAVED_ACTIVATION, (pairs[0][1], activation))
    setattr(module, pairs[0][1], torch.nn.Identity())


def apply_training_speedups(model: torch.nn.Module, speedups=SPEEDUPS) -> torch.nn.Module:
    """
    Swaps, in place, the blocks named in `speedups` (any of `SPEEDUPS`) for their faster equivalents, and returns
    `model`. Parameters, buffers and state-dict keys stay the same (the modules change class only; a SiLU fused
    into the GroupNorm before it is replaced by an `Identity`, which has no parameters either).
    """
    speedups = tuple(speedups)
    unknown = [name for name in speedups if name not in SPEEDUPS]
    if unknown:
        raise ValueError(f"`speedups` has {unknown}; allowed: {', '.join(SPEEDUPS)}.")
    from diffusers.models.attention_processor import Attention, AttnProcessor

    if "fused_group_norm" in speedups:
        for module in list(model.modules()):
            _fuse_silu(module)
    for module in model.modules():
        if "fused_group_norm" in speedups and type(module) in (torch.nn.GroupNorm, GroupNormFromChannelStats):
            module.__class__ = FusedGroupNorm
        elif "group_norm" in speedups and type(module) is torch.nn.GroupNorm:
            module.__class__ = GroupNormFromChannelStats
        elif "resnet_layout" in speedups and type(module) is ResnetBlock2D:
            module.__class__ = ResnetBlock2DWithoutCopy
        elif "upsample" in speedups and _plain_nearest_upsample(module):
            module.__class__ = NearestUpsample2D
        elif "attention" in speedups and isinstance(module, Attention) and not hasattr(module, _SAVED_PROCESSOR):
            # (a plain attribute, not a submodule: the state dict stays the same)
            object.__setattr__(module, _SAVED_PROCESSOR, module.processor)
            module.set_processor(AttnProcessor())
    return model


def remove_training_speedups(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes `apply_training_speedups` (on `model` or any module holding it): the stock blocks and processors."""
    for module in model.modules():
        if hasattr(module, _SAVED_ACTIVATION):
            name, activation = getattr(module, _SAVED_ACTIVATION)
            setattr(module, name, activation)
            object.__delattr__(module, _SAVED_ACTIVATION)
    for module in model.modules():
        if type(module) is FusedGroupNorm:
            module.__dict__.pop("fused_silu", None)
            module.__class__ = torch.nn.GroupNorm
        elif type(module) is GroupNormFromChannelStats:
            module.__class__ = torch.nn.GroupNorm
        elif type(module) is ResnetBlock2DWithoutCopy:
            module.__class__ = ResnetBlock2D
        elif type(module) is NearestUpsample2D:
            module.__class__ = Upsample2D
        elif hasattr(module, _SAVED_PROCESSOR):
            module.set_processor(getattr(module, _SAVED_PROCESSOR))
            object.__delattr__(module, _SAVED_PROCESSOR)
    return model
