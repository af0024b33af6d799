"""`diffusers_ssreg.regularizer`: the earlier name of `diffusers_ssreg.regularizers.ssreg`, where
`StateSpaceRegularizer` lives beside the other regularizers (see docs/method.md).

This name is bound to that very module object, so `from diffusers_ssreg.regularizer import
StateSpaceRegularizer, SSRegOutput, BranchPlan, REGULARIZER_SUBFOLDER` keeps working, and a name
replaced through either path (e.g. its `per_sample_l1`) is replaced for the training step.
"""

import sys

from .regularizers import ssreg as _implementation


sys.modules[__name__] = _implementation
