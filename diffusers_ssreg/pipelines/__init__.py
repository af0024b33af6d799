"""Pipelines for DiTs trained by `examples/train_dit.py` (the DDPM objective uses diffusers' own `DiTPipeline`)."""

from .pipeline_dit_flow import DiTFlowPipeline


__all__ = ["DiTFlowPipeline"]
