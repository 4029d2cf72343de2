"""coninfer: training-free open-vocabulary segmentation of aerial and satellite imagery (ConInfer).

The context solver works on its own: ``from coninfer import refine``.
"""

from __future__ import annotations

from coninfer.errors import ConInferError, InputError, ModelLoadError
from coninfer.solver import refine

__all__ = ["ConInferError", "InputError", "ModelLoadError", "refine", "__version__"]
__version__ = "0.1.0"
