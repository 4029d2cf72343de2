"""coninfer: training-free open-vocabulary segmentation of aerial and satellite imagery (ConInfer).

The context solver works on its own: ``from coninfer import refine``. Whole scenes and arrays:
``from coninfer import Segmenter`` (imported on first use, so the solver alone never loads rasterio or
transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coninfer.errors import ConInferError, InputError, ModelLoadError
from coninfer.solver import refine

if TYPE_CHECKING:
    from coninfer.segmenter import Segmenter

__all__ = ["ConInferError", "InputError", "ModelLoadError", "Segmenter", "refine", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Segmenter":
        from coninfer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'coninfer' has no attribute {name!r}")
