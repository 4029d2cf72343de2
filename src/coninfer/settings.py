"""One typed settings tree; every default is written here once.

``InferenceSettings`` (what the tile step and the solver compute) holds three sub-trees:

* ``solver``: :class:`SolverSettings` (the context solver's hyper-parameters),
* ``clip``: :class:`DenseCLIPSettings` (how the dense CLIP's last blocks are rewired),
* ``post``: :class:`PostSettings` (z -> class probabilities -> labels).

``SceneOptions`` says how a scene is cut into tiles and which context the solver sees. Every class is a frozen
dataclass that checks itself and names the bad field; change one with ``dataclasses.replace`` or, for the tree,
:meth:`InferenceSettings.with_values`, which routes a flat name (``temperature=20``) to the sub-tree owning it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from coninfer.errors import InputError

Method = Literal["coninfer", "decoupled", "baseline"]
METHODS = ("coninfer", "decoupled", "baseline")
FeatureSource = Literal["vfm", "clip"]
Prior = Literal["clip", "segearth-ov"]
PRIORS = ("clip", "segearth-ov")
Context = Literal["scene", "collection", "batch", "none"]
CONTEXTS = ("scene", "collection", "batch", "none")

VARIANTS = ("vanilla", "maskclip", "sclip", "clearclip", "segearth", "gem")

_VARIANT_TABLE = {  # paper Table 2 / ConInfer configs: (ignore_residual, attn_lambda)
    "vanilla": (False, 0.0),
    "maskclip": (False, 0.0),
    "sclip": (False, 0.0),
    "clearclip": (True, 0.0),
    "segearth": (True, 0.6),
    "gem": (False, 0.0),
}


_OPTIONS = ("model_res", "temperature", "iterations", "prior_scale", "attn_lambda", "prob_thd", "bg_index")
"""Settings that are also command-line options: their errors name the option (``--prob-thd``), which the
README documents field by field, so one message serves the CLI and the Python API."""


def _label(owner: str, name: str) -> str:
    if name in _OPTIONS:
        return "--" + name.replace("_", "-")
    return f"{owner}.{name}" if owner else name


def _positive_real(owner: str, name: str, value) -> float:
    # numbers.Real also covers numpy scalars (e.g. a value read from an .npz); they are stored as Python floats
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{_label(owner, name)} must be a finite number > 0, got {value!r}",
                         hint=f"pass a positive {name.replace('_', ' ')}")
    return float(value)


def _integer(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{_label(owner, name)} must be an integer >= {minimum}, got {value!r}",
                         hint=f"give an integer of at least {minimum}")
    return int(value)


@dataclass(frozen=True)
class SolverSettings:
    """Hyper-parameters of the context solver (defaults: ConInfer base config).

    ``free_temperature`` is the E-step temperature of the *decoupled* method's prior-free mixture fit (paper
    Table 4, "no joint learning"): 1.0 is a plain EM posterior (golden F reading (b), the default: it behaves
    like a real two-stage method); ``None`` uses ``temperature`` (reading (a), whose means collapse to the prior).
    The joint solver ignores it.

    ``block_rows`` only sets speed and memory (float32 temporaries of ``block_rows x D``); results do not depend
    on it beyond float rounding. ``None`` picks 2048 on the CPU (a block stays in cache between its two matrix
    products) and 65536 elsewhere (fewer, larger kernels: 4x faster than 2048 on an H200 at N=39200, D=1024).
    """

    temperature: float = 50.0
    iterations: int = 10
    prior_scale: float = 100.0
    init_topk: int = 8
    free_temperature: float | None = 1.0
    block_rows: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "prior_scale"):
            object.__setattr__(self, name, _positive_real("solver", name, getattr(self, name)))
        if self.free_temperature is not None:
            object.__setattr__(self, "free_temperature",
                               _positive_real("solver", "free_temperature", self.free_temperature))
        for name, minimum in (("iterations", 0), ("init_topk", 1), ("block_rows", 1)):
            value = getattr(self, name)
            if name == "block_rows" and value is None:
                continue
            object.__setattr__(self, name, _integer("solver", name, value, minimum))


@dataclass(frozen=True)
class DenseCLIPSettings:
    """How the dense CLIP's last blocks are rewired. Defaults = ConInfer's base config (SegEarth, no residual,
    λ = 0.6).

    ``gem_depth``, ``gem_iterations`` and ``gem_temperature`` are GEM's hyper-parameters (``gem_depth - 1`` last
    blocks carry the self-self attention path; ``None`` temperature = GEM's automatic inverse temperature);
    other variants ignore them.
    """

    variant: str = "segearth"
    ignore_residual: bool = True
    attn_lambda: float = 0.6
    gem_depth: int = 7
    gem_iterations: int = 1
    gem_temperature: float | None = None

    def __post_init__(self) -> None:
        variant = str(self.variant).lower()
        if variant not in VARIANTS:
            raise InputError(f"clip.variant: unknown dense-CLIP variant {self.variant!r}",
                             hint=f"choose one of {', '.join(VARIANTS)}")
        object.__setattr__(self, "variant", variant)
        if not isinstance(self.ignore_residual, bool):
            raise InputError(f"clip.ignore_residual: expected a bool, got {self.ignore_residual!r}",
                             hint="pass True or False")
        if not math.isfinite(float(self.attn_lambda)) or not 0.0 <= float(self.attn_lambda) <= 1.0:
            raise InputError(f"--attn-lambda must be in [0, 1], got {self.attn_lambda!r}",
                             hint="the paper uses 0.6 (0.1 for UAVid, Vaihingen, UDD5, VDD)")
        object.__setattr__(self, "attn_lambda", float(self.attn_lambda))
        object.__setattr__(self, "gem_depth", _integer("clip", "gem_depth", self.gem_depth, 2))
        object.__setattr__(self, "gem_iterations", _integer("clip", "gem_iterations", self.gem_iterations, 1))
        if self.gem_temperature is not None:
            object.__setattr__(self, "gem_temperature",
                               _positive_real("clip", "gem_temperature", self.gem_temperature))

    @classmethod
    def for_variant(cls, name: str, **overrides) -> DenseCLIPSettings:
        """The configuration the paper's Table 2 uses for ``name`` (see ``_VARIANT_TABLE``), then ``overrides``."""
        key = str(name).lower()
        if key not in _VARIANT_TABLE:
            raise InputError(f"clip.variant: unknown dense-CLIP variant {name!r}",
                             hint=f"choose one of {', '.join(VARIANTS)}")
        ignore_residual, attn_lambda = _VARIANT_TABLE[key]
        values = {"variant": key, "ignore_residual": ignore_residual, "attn_lambda": attn_lambda}
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class PostSettings:
    """z -> probabilities -> labels: ``logit_scale`` sharpens the class scores before the softmax; pixels whose
    top class probability is below ``prob_thd`` get class ``bg_index`` (``prob_thd`` 0 = off)."""

    logit_scale: float = 5.0
    prob_thd: float = 0.0
    bg_index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_scale", _positive_real("post", "logit_scale", self.logit_scale))
        if isinstance(self.prob_thd, bool) or not 0.0 <= float(self.prob_thd) <= 1.0:
            raise InputError(f"--prob-thd must be in [0, 1], got {self.prob_thd!r}", hint="use e.g. 0.1, or 0 for off")
        object.__setattr__(self, "prob_thd", float(self.prob_thd))
        object.__setattr__(self, "bg_index", _integer("post", "bg_index", self.bg_index, 0))


@dataclass(frozen=True)
class InferenceSettings:
    """Every number the tile step uses; defaults are the paper's base config.

    ``method``: ``coninfer`` (joint solver), ``decoupled`` (mixture fitted on the features alone, then one
    fusion with the prior; paper Table 4) or ``baseline`` (no solver: z = softmax(prior_scale * logits), the
    MaskCLIP* row). ``features="clip"`` takes the solver's features from CLIP's own dense tokens (paper Table 4,
    "context from CLIP features"). ``prior``: ``clip`` (the dense CLIP's patch tokens against the queries) or
    ``segearth-ov`` (SegEarth-OV's SimFeatUp-upsampled logits with its [CLS] bias, area-averaged onto the patch
    grid: the paper's "+SegEarth-OV" rows; needs an upsampler).
    """

    model_res: int = 448
    method: Method = "coninfer"
    features: FeatureSource = "vfm"
    prior: Prior = "clip"
    solver: SolverSettings = field(default_factory=SolverSettings)
    clip: DenseCLIPSettings = field(default_factory=DenseCLIPSettings)
    post: PostSettings = field(default_factory=PostSettings)

    def __post_init__(self) -> None:
        if isinstance(self.model_res, bool) or not isinstance(self.model_res, numbers.Integral) \
                or self.model_res < 16 or self.model_res % 2:
            raise InputError(f"--model-res must be an even number >= 16, got {self.model_res!r}",
                             hint="use e.g. --model-res 448")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.features not in ("vfm", "clip"):
            raise InputError(f"features must be 'vfm' or 'clip', got {self.features!r}")
        if self.prior not in PRIORS:
            raise InputError(f"--prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")

    @property
    def needs_vfm(self) -> bool:
        """Whether this method reads VFM features (the one rule; the CLI and the facade ask it)."""
        return self.method != "baseline" and self.features == "vfm"

    def with_values(self, **values) -> InferenceSettings:
        """A copy with flat names routed to their sub-tree: ``with_values(temperature=20, prob_thd=0.3)``.

        ``None`` values are skipped (an option the user did not give). An unknown name is an error.
        """
        values = {name: value for name, value in values.items() if value is not None}
        top, branches = {}, {"solver": {}, "clip": {}, "post": {}}
        for name, value in values.items():
            owner = _OWNER.get(name)
            if owner is None:
                raise InputError(f"unknown inference setting {name!r}",
                                 hint=f"use one of {', '.join(sorted(_OWNER))}")
            (top if owner == "" else branches[owner])[name] = value
        for branch, changes in branches.items():
            if changes:
                top[branch] = dataclasses.replace(getattr(self, branch), **changes)
        return dataclasses.replace(self, **top)


_OWNER = {
    **{f.name: "" for f in dataclasses.fields(InferenceSettings) if f.name not in ("solver", "clip", "post")},
    **{f.name: "solver" for f in dataclasses.fields(SolverSettings)},
    **{f.name: "clip" for f in dataclasses.fields(DenseCLIPSettings)},
    **{f.name: "post" for f in dataclasses.fields(PostSettings)},
}


@dataclass(frozen=True)
class SceneOptions:
    """How a scene is cut and which context the solver sees.

    ``tile_size`` is in source pixels; each tile is resized to the model resolution. The default 448 keeps the
    source ground sampling distance (448 px -> 448 model px), as the paper's 448² crops of 0.1-1 m imagery do;
    use a larger tile for very fine imagery (e.g. 896 at 0.1 m) so that a patch still covers a few metres.
    ``overlap`` (source px) is blended linearly so tiles leave no seams; 0 is the paper's setting.
    ``context``: ``scene`` (one mixture over every tile), ``collection`` (one mixture over every tile of every
    input of :meth:`~coninfer.segmenter.Segmenter.segment_files`; for one file, the scene), ``batch`` (groups
    of ``context_size`` tiles, the paper's evaluation protocol) or ``none`` (the prior alone).
    """

    tile_size: int = 448
    overlap: int = 0
    context: Context = "scene"
    context_size: int = 50
    batch_size: int = 8
    solver_chunk_tiles: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, numbers.Integral) or self.tile_size < 16:
            raise InputError(f"--tile-size must be >= 16 px, got {self.tile_size!r}", hint="use e.g. --tile-size 448")
        if not 0 <= self.overlap < self.tile_size // 2:
            raise InputError(f"--overlap must be in 0..{self.tile_size // 2 - 1} px, got {self.overlap}",
                             hint="use an overlap smaller than half the tile size")
        if self.context not in CONTEXTS:
            raise InputError(f"--context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        for name in ("context_size", "batch_size", "solver_chunk_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                default = getattr(SceneOptions, name)
                if name == "solver_chunk_tiles":  # a Python-only option
                    label, hint = name, f"use e.g. {name}={default}"
                else:
                    label = "--" + name.replace("_", "-")
                    hint = f"use e.g. {label} {default}"
                raise InputError(f"{label} must be >= 1 tile, got {value!r}", hint=hint)
