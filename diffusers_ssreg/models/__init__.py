"""Models trained on VAE latents: `LightningDiTTransformer2DModel` (diffusers' `DiTTransformer2DModel` covers the original DiT)."""

from .transformer_lightningdit import LIGHTNINGDIT_PRESETS, LightningDiTTransformer2DModel, lightningdit_forward_flops


__all__ = ["LIGHTNINGDIT_PRESETS", "LightningDiTTransformer2DModel", "lightningdit_forward_flops"]
