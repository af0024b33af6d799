"""
`LightningDiTTransformer2DModel`: the class-conditional DiT with LightningDiT's architectural changes.

LightningDiT (Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models", arXiv 2501.01423; code: github.com/hustvl/LightningDiT, `models/lightningdit.py`) keeps DiT's
layout (patch embedding, fixed 2D sin-cos position embedding, AdaLN-Zero blocks conditioned on
timestep + class, a modulated final layer) and changes the block:
  - SwiGLU feed-forward with hidden size `int(2/3 * mlp_ratio * hidden_size)` instead of a GELU MLP;
  - RMSNorm (with a learned scale) instead of LayerNorm;
  - 2D rotary position embedding (RoPE) on queries and keys, beside the sin-cos embedding of the input;
  - optionally RMSNorm on queries and keys (QK-norm);
  - no learned sigma: the output has `in_channels` channels (a flow-matching velocity).
The arXiv 2604.11089 paper (Sec. 5) trains this model at DiT-B/2 size to score latent spaces.

Conventions of LightningDiT that this model keeps, so that its numerics match the reference code:
  - `timestep` is the flow time `t` in [0, 1] with 0 = noise and 1 = data (LightningDiT's `transport`, inherited
    from SiT), embedded as is (no scaling by 1000);
  - the class index `num_classes` is the null class of classifier-free guidance;
  - parameter names follow `models/lightningdit.py` (`x_embedder`, `t_embedder`, `y_embedder`, `blocks.*.attn.qkv`,
    `blocks.*.mlp.w12`, `final_layer`, ...); the sin-cos and rotary tables are recomputed from the config
    (non-persistent buffers), not stored.
Written for `torch.compile`: no data-dependent control flow, one fused qkv projection, attention through
`torch.nn.functional.scaled_dot_product_attention`, fixed rotary tables as buffers.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


# --------------------------------------------------------------------------------------------
# Presets: DiT's sizes (DiT paper, Table 1) x patch 1 and 2, as LightningDiT names them
# (`models/lightningdit.py`, `LightningDiT_models`); the table doubles as the `--preset` choices
# --------------------------------------------------------------------------------------------

LIGHTNINGDIT_PRESETS = {
    "LightningDiT-S/1": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=1),  # hidden 384
    "LightningDiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),
    "LightningDiT-B/1": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=1),  # hidden 768
    "LightningDiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),  # the paper's
    "LightningDiT-L/1": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=1),  # hidden 1024
    "LightningDiT-L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=2),
    "LightningDiT-XL/1": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=1),  # hidden 1152
    "LightningDiT-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2),
}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, normalized in float32 then cast back, as LightningDiT's `models/rmsnorm.py`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        if hasattr(F, "rms_norm"):  # torch >= 2.4: one fused kernel in eager; the same decomposition when compiled
            x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.type_as(hidden_states) * self.weight


def rotary_tables(head_dim: int, grid_size: int, theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    cos/sin tables `(grid_size**2, head_dim)` of the 2D rotary embedding for tokens in row-major order.

    As LightningDiT's `VisionRotaryEmbeddingFast` (EVA-02): the first half of each head's channels rotates with
    the token's row, the second half with its column; within each half, channel pairs (2k, 2k+1) share the
    frequency `theta ** (-4k / head_dim)`.
    """
    if head_dim % 4:
        raise ValueError(f"the 2D rotary embedding needs an attention_head_dim divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    frequencies = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (head_dim / 4,)
    positions = torch.arange(grid_size, dtype=torch.float64)
    angles = (positions[:, None] * frequencies[None]).repeat_interleave(2, dim=-1)  # (grid, head_dim / 2)
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, grid_size, -1)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return angles.cos().float(), angles.sin().float()


# (x0, x1) -> (-x1, x0) is the pair swap (x1, x0) times these signs: the rotation becomes a view, a flip of the
# pair axis and two products, which a compiler fuses into one pass without the stack/select of a rotate-half.
_PAIR_SIGNS = (-1.0, 1.0)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """
    `x * cos + swap(x) * signed_sin` in float32, returned in `x`'s dtype, where `swap` exchanges the channels of each
    pair (2k, 2k+1) and `signed_sin` holds `(-sin, sin)` per pair (`signed_rotary_tables`): each pair is rotated by
    its angle. `cos`/`signed_sin` broadcast against `x` (last dimension: the head's channels).
    """
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos + swapped * signed_sin).to(x.dtype)


def signed_rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` of `rotary_tables` as `rotate_pairs` takes them: the sine with the sign of each pair's swap."""
    signs = torch.tensor(_PAIR_SIGNS, dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
    return cos, sin * signs


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Rotates each channel pair (2k, 2k+1) of `x` `(batch_size, num_tokens, heads, head_dim)` by the token's angle
    (`cos`/`sin` of `rotary_tables`: `(num_tokens, 1, head_dim)`), `(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`,
    in float32; returns `x`'s dtype.
    """
    return rotate_pairs(x, *signed_rotary_tables(cos, sin))


class LightningDiTAttention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional QK-norm, 2D RoPE, scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: bool = False, use_rmsnorm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner_dim, bias=True)
        if qk_norm:  # LightningDiT: the block's norm type, over each head's channels
            self.q_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
            self.k_norm = RMSNorm(head_dim) if use_rmsnorm else nn.LayerNorm(head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(inner_dim, dim, bias=True)

    def forward(self, hidden_states: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """`rope`: the `(cos, signed_sin)` tables of `rotate_pairs`, `(num_tokens, 1, 1, head_dim)`."""
        batch_size, num_tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query_key, value = qkv[:, :, :2], qkv[:, :, 2]  # views of the projection
        if self.q_norm is not None:
            query_key = torch.stack([self.q_norm(query_key[:, :, 0]), self.k_norm(query_key[:, :, 1])], dim=2)
        if rope is not None:  # queries and keys rotated together: one pass
            query_key = rotate_pairs(query_key, *rope)
        # (a float32 norm scale promotes the normalized queries and keys: back to the projection's dtype)
        query, key = query_key.to(value.dtype).unbind(2)  # (batch_size, num_tokens, heads, head_dim)
        # (batch, heads, tokens, head_dim) views: no copies, the attention kernels take strided inputs, and their
        # output in the query's layout makes the transpose back a view
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch_size, num_tokens, -1))


class SwiGLUFeedForward(nn.Module):
    """`w3(silu(x W1) * (x W2))` with W1 and W2 fused into one projection `w12` (LightningDiT's `SwiGLUFFN`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(hidden_states).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class GELUFeedForward(nn.Module):
    """DiT's MLP: `fc2(gelu_tanh(fc1(x)))` (used when `use_swiglu=False`)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh"))


def _norm(dim: int, use_rmsnorm: bool, eps: float) -> nn.Module:
    return RMSNorm(dim, eps=eps) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class LightningDiTBlock(nn.Module):
    """One AdaLN-Zero transformer block: x + g1 * attn(mod(norm1(x))), then x + g2 * ffn(mod(norm2(x)))."""

    def __init__(self, dim, num_heads, head_dim, ffn_dim, use_swiglu=True, use_rmsnorm=True, qk_norm=False, eps=1e-6):
        super().__init__()
        self.norm1 = _norm(dim, use_rmsnorm, eps)
        self.attn = LightningDiTAttention(dim, num_heads, head_dim, qk_norm=qk_norm, use_rmsnorm=use_rmsnorm)
        self.norm2 = _norm(dim, use_rmsnorm, eps)
        self.mlp = SwiGLUFeedForward(dim, ffn_dim) if use_swiglu else GELUFeedForward(dim, ffn_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, hidden_states, conditioning, rope=None):
        modulation = self.adaLN_modulation(conditioning).unsqueeze(1)  # (batch_size, 1, 6 * dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        normed = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        hidden_states = hidden_states + gate_msa * self.attn(normed, rope)
        normed = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.mlp(normed)


class LightningDiTFinalLayer(nn.Module):
    """Modulated norm, then a linear map of each token to its `patch_size**2 * out_channels` outputs."""

    def __init__(self, dim, patch_size, out_channels, use_rmsnorm=True, eps=1e-6):
        super().__init__()
        self.norm_final = _norm(dim, use_rmsnorm, eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, hidden_states, conditioning):
        shift, scale = self.adaLN_modulation(conditioning).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(self.norm_final(hidden_states) * (1 + scale) + shift)


class PatchEmbedder(nn.Module):
    """Non-overlapping patches to tokens `(batch_size, (H / p) * (W / p), dim)` in row-major order (a strided conv)."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latents):
        # contiguous: a transposed view would give the whole residual stream a (batch, dim, tokens) memory order,
        # in which every norm reduces along a strided axis
        return self.proj(latents).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedding: 256 sinusoidal features `[cos, sin]` (max period 10000), then an MLP."""

    def __init__(self, dim, frequency_embedding_size=256):
        super().__init__()
        self.frequencies = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timestep):
        features = self.frequencies(timestep)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A table of `num_classes + 1` class embeddings; the last row is the null class of classifier-free guidance."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels):
        return self.embedding_table(class_labels)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class LightningDiTTransformer2DModel(ModelMixin, ConfigMixin):
    r"""
    A class-conditional 2D diffusion transformer with LightningDiT's changes to DiT (arXiv 2501.01423): SwiGLU,
    RMSNorm, 2D RoPE, optional QK-norm, AdaLN-Zero, no learned sigma. Predicts LightningDiT's flow velocity
    `data - noise` at flow time `t` (0: noise, 1: data).

    Parameters:
        sample_size (`int`, *optional*, defaults to 32): height and width of the latents (square).
        patch_size (`int`, *optional*, defaults to 2): side of the square patches; must divide `sample_size`.
        in_channels (`int`, *optional*, defaults to 32): `latent_channels` of the VAE.
        out_channels (`int`, *optional*): output channels; defaults to `in_channels` (no learned sigma).
        num_layers (`int`, *optional*, defaults to 28): transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 16): attention heads.
        attention_head_dim (`int`, *optional*, defaults to 72): channels per head (hidden size = heads x head dim);
            divisible by 4 when `use_rope`.
        mlp_ratio (`float`, *optional*, defaults to 4.0): feed-forward width over hidden size; SwiGLU uses 2/3 of it
            (`int(2 / 3 * int(hidden_size * mlp_ratio))`, LightningDiT's rule).
        num_classes (`int`, *optional*, defaults to 1000): classes; index `num_classes` is the null class.
        use_swiglu (`bool`, *optional*, defaults to `True`): SwiGLU feed-forward (else DiT's GELU MLP).
        use_rmsnorm (`bool`, *optional*, defaults to `True`): RMSNorm with a learned scale (else LayerNorm
            without affine parameters, as DiT).
        use_rope (`bool`, *optional*, defaults to `True`): 2D rotary position embedding on queries and keys.
        use_qk_norm (`bool`, *optional*, defaults to `False`): normalize queries and keys per head (LightningDiT's
            configs leave it off and recommend it against NaN losses).
        rope_theta (`float`, *optional*, defaults to 10000.0): base period of the rotary embedding.
        norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the block and final norms.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LightningDiTBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 32,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        use_rope: bool = True,
        use_qk_norm: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        for name, value in (("sample_size", sample_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("num_layers", num_layers), ("num_attention_heads", num_attention_heads),
                            ("attention_head_dim", attention_head_dim), ("num_classes", num_classes)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` {sample_size} is not divisible by `patch_size` {patch_size}.")
        if not mlp_ratio > 0:
            raise ValueError(f"`mlp_ratio` must be positive, got {mlp_ratio}.")
        if use_rope and attention_head_dim % 4:
            raise ValueError(f"`use_rope` needs an `attention_head_dim` divisible by 4, got {attention_head_dim}.")
        dim = num_attention_heads * attention_head_dim
        if dim % 4:
            raise ValueError(f"the hidden size (heads x head dim = {dim}) must be divisible by 4 (2D sin-cos embedding).")
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False
        grid = sample_size // patch_size

        self.x_embedder = PatchEmbedder(in_channels, dim, patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim)
        pos_embed = get_2d_sincos_pos_embed(dim, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
        self.register_buffer("pos_embed", pos_embed.float().unsqueeze(0), persistent=False)  # fixed (DiT)
        if use_rope:  # (tokens, 1, 1, head_dim): broadcast over queries/keys and heads
            cos, sin = signed_rotary_tables(*rotary_tables(attention_head_dim, grid, rope_theta))
            self.register_buffer("rope_cos", cos[:, None, None], persistent=False)
            self.register_buffer("rope_sin", sin[:, None, None], persistent=False)  # signed (`rotate_pairs`)
        else:
            self.rope_cos = self.rope_sin = None
        ffn_dim = int(dim * mlp_ratio)
        if use_swiglu:
            ffn_dim = int(2 / 3 * ffn_dim)  # equal parameters to the GELU MLP (LightningDiT's LightningDiTBlock)
        self.blocks = nn.ModuleList(
            [
                LightningDiTBlock(dim, num_attention_heads, attention_head_dim, ffn_dim, use_swiglu, use_rmsnorm,
                                  use_qk_norm, norm_eps)  # fmt: skip
                for _ in range(num_layers)
            ]
        )
        self.final_layer = LightningDiTFinalLayer(dim, patch_size, self.out_channels, use_rmsnorm, norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """DiT's initialization: Xavier-uniform linears, zero biases, N(0, 0.02) embeddings, zero-out adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight  # like a linear map of the flattened patch
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)  # AdaLN-Zero: every block starts as the identity
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            hidden_states (`torch.Tensor`): noisy latents `(batch_size, in_channels, sample_size, sample_size)`.
            timestep (`torch.Tensor`): flow time `t` in [0, 1] (0: noise, 1: data), `(batch_size,)` or a scalar.
            class_labels (`torch.LongTensor`): `(batch_size,)` in `[0, num_classes]`; `num_classes` is the null class.
            return_dict (`bool`, *optional*, defaults to `True`): return a [`Transformer2DModelOutput`].

        Returns:
            [`Transformer2DModelOutput`] or `tuple`: the velocity `(batch_size, out_channels, sample_size, sample_size)`.
        """
        batch_size, _, height, width = hidden_states.shape
        size, patch = self.config.sample_size, self.config.patch_size
        if height != size or width != size:
            raise ValueError(f"`hidden_states` must be {size}x{size} (the config's sample_size), got {height}x{width}.")
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        # The sin-cos table in the weights' dtype: float32 when training under autocast (a float32 residual stream,
        # as LightningDiT's), the model's dtype when it was loaded in half precision (which leaves buffers float32).
        hidden_states = self.x_embedder(hidden_states) + self.pos_embed.to(self.x_embedder.proj.weight.dtype)
        conditioning = self.t_embedder(timestep) + self.y_embedder(class_labels)  # (batch_size, dim)
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, conditioning, rope)
            else:
                hidden_states = block(hidden_states, conditioning, rope)
        hidden_states = self.final_layer(hidden_states, conditioning)  # (batch_size, tokens, patch**2 * out_channels)

        grid = size // patch  # unpatchify: (b, h, w, p, q, c) -> (b, c, h, p, w, q)
        hidden_states = hidden_states.reshape(batch_size, grid, grid, patch, patch, self.out_channels)
        output = hidden_states.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, self.out_channels, size, size)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


# --------------------------------------------------------------------------------------------
# Compute: FLOPs of one forward pass per image, for model FLOPs utilization (MFU)
# --------------------------------------------------------------------------------------------


def lightningdit_forward_flops(config) -> int:
    """
    FLOPs (2 per multiply-add) of the matrix products of one forward pass of one image, from a
    `LightningDiTTransformer2DModel` config. With T = (sample_size / patch_size)^2 tokens, D the hidden size,
    F the feed-forward width, C_in/C_out the channels and L the layers:

        patch embedding       2 T (p^2 C_in) D
        timestep MLP          2 (256 D + D^2)
        per block             2 T D (3D) + 2 T D D          qkv and output projections
                              2 T^2 D + 2 T^2 D             scores q k^T and the weighted sum of v
                              2 T D (2F) + 2 T F D          SwiGLU (GELU MLP: 2 T D F + 2 T F D)
                              2 D (6D)                      AdaLN modulation
        final layer           2 D (2D) + 2 T D (p^2 C_out)

    Norms, activations, RoPE, softmax and the residual adds are not counted (the usual MFU convention).
    A training step is about 3x this (forward + backward).
    """
    config = dict(config)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    patch, tokens = config["patch_size"], (config["sample_size"] // config["patch_size"]) ** 2
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    ffn = int(dim * config.get("mlp_ratio", 4.0))
    swiglu = config.get("use_swiglu", True)
    if swiglu:
        ffn = int(2 / 3 * ffn)
    per_block = (
        2 * tokens * dim * 4 * dim  # qkv + output projection
        + 4 * tokens * tokens * dim  # attention scores and weighted values
        + (6 if swiglu else 4) * tokens * dim * ffn  # feed-forward
        + 2 * dim * 6 * dim  # AdaLN modulation
    )
    return int(
        2 * tokens * patch * patch * in_channels * dim
        + 2 * (256 * dim + dim * dim)
        + config["num_layers"] * per_block
        + 2 * dim * 2 * dim
        + 2 * tokens * dim * patch * patch * out_channels
    )
