"""Named model presets: where each model comes from, in which format, under which licence, with which pixel statistics.

A preset is data; :func:`load_vlm` / :func:`load_vfm` turn a preset name *or* a path/hub id into a model. A preset
is loaded by the loader registered for its ``(role, format)`` (:func:`coninfer.encoders.register_loader`); paths
and hub ids go to the role's detecting loader (:func:`~coninfer.encoders.load_clip.load_clip`,
:func:`~coninfer.encoders.load_vfm.load_vfm`). Names are unique per role: ``tiny-random`` is one preset of each
role (format ``tiny``, seeded random tiny models built in memory for offline smoke tests; labels meaningless).
Weights come from the Hugging Face hub (cached in the usual ``HF_HOME`` cache) or from local files; nothing is
hard-coded to a folder.

A third role, ``upsampler``, names SimFeatUp weights for ``--prior segearth-ov``: it has no loader registry (one
format, ``simfeatup``, read by :func:`coninfer.encoders.simfeatup.load_simfeatup`, which resolves these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coninfer.encoders import ROLES, Role, get_loader
from coninfer.encoders.checkpoints import hub_download, hub_snapshot
from coninfer.encoders.normalization import IMAGENET, OPENAI_CLIP, SAT493M, Normalization
from coninfer.errors import InputError, ModelLoadError

BUILTIN = "builtin"  # the source of presets built in memory (format "tiny")
SINGLE_FILE_FORMATS = ("open_clip", "timm", "simfeatup")  # formats whose preset names one file of the repository
UPSAMPLER = "upsampler"  # the role of SimFeatUp weights; not an encoder, so not in encoders.ROLES
PRESET_ROLES = (*ROLES, UPSAMPLER)


@dataclass(frozen=True)
class ModelPreset:
    """One downloadable (or built-in) model.

    ``source`` is a hub repository id (or ``builtin``); ``filename`` names the single checkpoint file inside
    the repository for formats that ship one file (open_clip, timm); ``None`` means the whole repository.
    ``format`` selects the loader (``LOADERS[(role, format)]``). ``normalization`` is the pixel statistics the
    weights were trained with; the loader gives them to the model. ``activation`` overrides the MLP activation
    an open_clip file cannot record (``None``: the loader's QuickGELU, right for OpenAI-initialised models).
    """

    name: str
    role: Role
    source: str
    format: str
    licence: str
    description: str
    normalization: Normalization | None = None
    filename: str | None = None
    gated: bool = False
    default: bool = False
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.role not in PRESET_ROLES:
            raise ValueError(f"ModelPreset {self.name!r}: role must be one of {', '.join(PRESET_ROLES)}, "
                             f"got {self.role!r}")
        if (self.role == UPSAMPLER and self.format not in ("simfeatup", "tiny")) or (
                self.format == "simfeatup" and self.role != UPSAMPLER):
            raise ValueError(f"ModelPreset {self.name!r}: format 'simfeatup' is the upsampler role's (or 'tiny')")
        if not self.format or not self.format.replace("_", "").isalnum():
            raise ValueError(f"ModelPreset {self.name!r}: format must be a loader format name, got {self.format!r}")
        if (self.filename is None) != (self.format not in SINGLE_FILE_FORMATS):
            raise ValueError(f"ModelPreset {self.name!r}: filename is needed for {'/'.join(SINGLE_FILE_FORMATS)} "
                             "and only for them")
        if (self.format == "tiny") != (self.source == BUILTIN):
            raise ValueError(f"ModelPreset {self.name!r}: source {BUILTIN!r} is for format 'tiny', and only for it")
        if self.normalization is not None and not isinstance(self.normalization, Normalization):
            raise ValueError(f"ModelPreset {self.name!r}: normalization must be a Normalization")

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN


_PRESET_LIST = (
    ModelPreset("clip-b16", "vlm", "openai/clip-vit-base-patch16", "transformers", "MIT",
                "OpenAI CLIP ViT-B/16, the paper's dense CLIP", OPENAI_CLIP, default=True),
    # RemoteCLIP is loaded with open_clip's "ViT-B-32"/"ViT-L-14" configs, whose MLPs use GELU, not QuickGELU
    ModelPreset("remoteclip-b32", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                "RemoteCLIP ViT-B/32 (remote-sensing CLIP; run at 2x resolution to match the 16-px grid)",
                OPENAI_CLIP, filename="RemoteCLIP-ViT-B-32.pt", activation="gelu"),
    ModelPreset("remoteclip-l14", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                "RemoteCLIP ViT-L/14", OPENAI_CLIP, filename="RemoteCLIP-ViT-L-14.pt", activation="gelu"),
    ModelPreset("georsclip-b32", "vlm", "Zilun/GeoRSCLIP", "open_clip", "see the model card (research use)",
                "GeoRSCLIP ViT-B/32 trained on RS5M", OPENAI_CLIP, filename="ckpt/RS5M_ViT-B-32.pt"),
    ModelPreset("dinov3-l16-sat", "vfm", "timm/vit_large_patch16_dinov3.sat493m", "timm", "DINOv3 License",
                "DINOv3 ViT-L/16 SAT-493M, ungated timm copy (paper default)", SAT493M,
                filename="model.safetensors", default=True),
    ModelPreset("dinov3-l16-sat-meta", "vfm", "facebook/dinov3-vitl16-pretrain-sat493m", "transformers",
                "DINOv3 License", "DINOv3 ViT-L/16 SAT-493M, Meta's gated transformers repository", SAT493M,
                gated=True),
    ModelPreset("dinov3-h16plus-lvd", "vfm", "timm/vit_huge_plus_patch16_dinov3.lvd1689m", "timm",
                "DINOv3 License", "DINOv3 ViT-H+/16 LVD-1689M, ungated timm copy (paper: UAVid, VDD)", IMAGENET,
                filename="model.safetensors"),
    ModelPreset("dinov2-l14", "vfm", "facebook/dinov2-large", "transformers", "Apache-2.0",
                "DINOv2 ViT-L/14 (ungated alternative VFM; not in the paper)", IMAGENET),
    # The file SegEarth-OV's configs load (configs/base_config.py: jbu_one for CLIP ViT-B/16, trained on Million-AID).
    # It ships in the GitHub repository likyoo/SegEarth-OV at this path; a Hugging Face copy under the same id and
    # path is assumed, not confirmed: where it is missing, download the file from GitHub and pass its path.
    ModelPreset("simfeatup-clip-b16", UPSAMPLER, "likyoo/SegEarth-OV", "simfeatup", "see likyoo/SegEarth-OV",
                "SimFeatUp jbu_one for CLIP ViT-B/16 (SegEarth-OV's configs; hub copy unconfirmed)",
                filename="simfeatup_dev/weights/xclip_jbu_one_million_aid.ckpt"),
    ModelPreset("tiny-random", "vlm", BUILTIN, "tiny", "Apache-2.0",
                "seeded random tiny CLIP, offline smoke tests only: labels are meaningless", OPENAI_CLIP),
    ModelPreset("tiny-random", "vfm", BUILTIN, "tiny", "Apache-2.0",
                "seeded random tiny DINOv3, offline smoke tests only: features are meaningless", IMAGENET),
    ModelPreset("tiny-random", UPSAMPLER, BUILTIN, "tiny", "Apache-2.0",
                "seeded random SimFeatUp jbu_one for the tiny CLIP (C = 32), offline smoke tests only"),
)
PRESETS: dict[tuple[str, str], ModelPreset] = {(preset.role, preset.name): preset for preset in _PRESET_LIST}
"""Every preset by ``(role, name)``, in table order."""


# what a transformers repository needs; the other weight formats (TF, Flax, ONNX) are never fetched
_TRANSFORMERS_FILES = ["*.json", "*.txt", "model*.safetensors"]
_TRANSFORMERS_PICKLE_FILES = ["*.json", "*.txt", "pytorch_model*.bin"]
_TOKENIZER_FILES = ["*.json", "*.txt"]


def preset_names(role: Role | None = None) -> list[str]:
    """Names of the presets of ``role`` (of both roles when None, each once), in table order."""
    return list(dict.fromkeys(p.name for p in PRESETS.values() if role is None or p.role == role))


def get_preset(name: str, role: Role | None = None) -> ModelPreset:
    """The preset called ``name`` of ``role``; with ``role`` None the first of that name in table order.

    Raises:
        InputError: no such preset (or one of the other role); the message lists the valid names.
    """
    matches = [p for p in PRESETS.values() if p.name == name]
    preset = next((p for p in matches if role is None or p.role == role), None)
    if preset is not None:
        return preset
    names = ", ".join(preset_names(role))
    if matches:
        raise InputError(f"{name!r} is a {matches[0].role} preset, not a {role} one", hint=f"{role} presets: {names}")
    raise InputError(f"unknown model preset {name!r}", hint=f"use one of: {names}; or a local path / hub id")


def default_preset(role: Role) -> ModelPreset:
    """The preset the paper uses for ``role`` (CLIP ViT-B/16, DINOv3 ViT-L/16 SAT-493M)."""
    return next(p for p in PRESETS.values() if p.role == role and p.default)


def is_preset(name: str, role: Role) -> bool:
    """True when ``name`` is a preset of ``role``."""
    return (role, name) in PRESETS


def download(name: str, role: Role | None = None) -> Path:
    """Fetch a preset's files into the Hugging Face cache; return the checkpoint file (open_clip) or folder.

    The files are those the loaders read, so that :func:`load_vlm` / :func:`load_vfm` work offline afterwards:
    open_clip presets also fetch the default CLIP tokenizer; timm presets their ``config.json``.

    Raises:
        InputError: unknown or built-in preset.
        ModelLoadError: gated repository, no network and not cached, ...
    """
    if all(p.name != name for p in PRESETS.values()):
        raise InputError(f"unknown model preset {name!r}",
                         hint=f"download one of: {', '.join(preset_names())} (see `coninfer models list`)")
    preset = get_preset(name, role)
    if preset.builtin:
        raise InputError(f"{name} is built in and needs no download",
                         hint=f"use it directly, e.g. --{preset.role} {name}")
    if preset.format == "open_clip":
        from coninfer.encoders.load_clip import DEFAULT_TOKENIZER

        checkpoint = hub_download(preset.source, preset.filename)
        hub_snapshot(DEFAULT_TOKENIZER, allow_patterns=_TOKENIZER_FILES)  # open_clip files carry no tokenizer
        return checkpoint
    if preset.format == "simfeatup":
        return hub_download(preset.source, preset.filename)
    if preset.format == "timm":
        hub_download(preset.source, "config.json")  # timm repositories keep the architecture next to the weights
        return hub_download(preset.source, preset.filename).parent
    folder = hub_snapshot(preset.source, allow_patterns=_TRANSFORMERS_FILES)
    if not any(folder.glob("*.safetensors")):  # older repositories only have the pickle weights
        folder = hub_snapshot(preset.source, allow_patterns=_TRANSFORMERS_PICKLE_FILES)
    return folder


def load_vlm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **clip_options):
    """A DenseCLIP from a preset name, a local file/folder, or a hub id (``owner/name`` or
    ``owner/name/file.pt``). ``clip_options`` go to :func:`coninfer.encoders.load_clip.load_clip` (``settings``,
    ``heads``, ``activation``, ``tokenizer``, ``normalization``, ...).

    Raises:
        ModelLoadError: not a preset, an existing path nor a hub id; not downloadable; not a CLIP checkpoint.
    """
    return _load("vlm", name_or_path, device=device, dtype=dtype, options=clip_options)


def load_vfm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **vfm_options):
    """A DenseVFM from a preset name, a local file/folder, or a hub id. ``vfm_options`` go to
    :func:`coninfer.encoders.load_vfm.load_vfm` (``format``, ``normalization``, ``num_heads``, ...).

    Raises:
        ModelLoadError: not a preset, an existing path nor a hub id; not downloadable; not a ViT checkpoint.
    """
    return _load("vfm", name_or_path, device=device, dtype=dtype, options=vfm_options)


def _load(role: Role, name_or_path: str, *, device, dtype, options: dict):
    """A preset through its registered loader; anything else through the role's detecting loader."""
    if is_preset(name_or_path, role):
        preset = PRESETS[(role, name_or_path)]
        return get_loader(role, preset.format)(preset, device=device, dtype=dtype, **options)
    _check_source(name_or_path, role)
    if role == "vlm":
        from coninfer.encoders import load_clip

        return load_clip.load_clip(name_or_path, device=device, dtype=dtype, **options)
    from coninfer.encoders import load_vfm as load_vfm_module

    return load_vfm_module.load_vfm(name_or_path, device=device, dtype=dtype, **options)


def _check_source(source: str, role: Role) -> None:
    """Reject a string that is neither a preset of ``role``, an existing path, nor shaped like a hub id.

    Hub ids are ``owner/name`` (a repository) or, for CLIP, ``owner/name/path/file.pt`` (one file of it);
    anything that starts like a local path (``/``, ``.``, ``~``) or has no ``/`` must exist on disk.
    """
    if Path(source).expanduser().exists():
        return
    hint = f"{role} presets: {', '.join(preset_names(role))} (see `coninfer models list`); or pass an existing local path"
    other = next((p for p in PRESETS.values() if p.name == source), None)
    if other is not None:
        raise ModelLoadError(f"--{role} {source!r} is a {other.role} preset, not a {role} one", hint=hint)
    looks_local = source.startswith(("/", ".", "~", "\\")) or "/" not in source
    too_deep = role == "vfm" and source.count("/") > 1  # the VFM loader takes whole repositories only
    if looks_local or too_deep or source.endswith("/") or "//" in source:
        raise ModelLoadError(f"--{role} {source!r} is neither a preset, an existing file/folder, nor a hub id",
                             hint=hint)
