"""Pipelines for DiTs trained by `examples/train_dit.py` (the DDPM objective uses diffusers' own `DiTPipeline`).

Importing this module (`import diffusers_ssreg` does) also makes the classes reachable as attributes of the
`diffusers` module, where `DiffusionPipeline.from_pretrained(folder)` looks up the `_class_name` of a folder's
`model_index.json`; the folder's components name their own modules and need nothing more.
"""

import diffusers

from .pipeline_dit_flow import DiTFlowPipeline
from .pipeline_lightningdit import LightningDiTPipeline


__all__ = ["DiTFlowPipeline", "LightningDiTPipeline"]

for _pipeline_class in (DiTFlowPipeline, LightningDiTPipeline):
    if not hasattr(diffusers, _pipeline_class.__name__):  # never shadow a class diffusers itself defines
        setattr(diffusers, _pipeline_class.__name__, _pipeline_class)
