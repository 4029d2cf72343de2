"""Named model presets: where each model comes from, in which format, under which licence.

A preset is data; :func:`load_vlm` / :func:`load_vfm` turn a preset name *or* a path/hub id into a model.
Weights come from the Hugging Face hub (cached in the usual ``HF_HOME`` cache) or from local files; nothing is
hard-coded to a folder. ``tiny-random`` builds seeded random tiny models in memory for offline smoke tests: its
labels are meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from coninfer.encoders.checkpoints import hub_download, hub_snapshot
from coninfer.errors import InputError, ModelLoadError

Role = Literal["vlm", "vfm"]
Format = Literal["transformers", "open_clip", "timm", "meta", "tiny"]


@dataclass(frozen=True)
class ModelPreset:
    """One downloadable (or built-in) model.

    ``source`` is a hub repository id (or ``builtin``); ``filename`` names the single checkpoint file inside
    the repository for formats that ship one file (open_clip, timm); ``None`` means the whole repository.
    ``activation`` overrides the MLP activation an open_clip file cannot record (``None``: the loader's
    QuickGELU, right for OpenAI-initialised models loaded as OpenAI models).
    """

    name: str
    role: Role
    source: str
    format: Format
    licence: str
    description: str
    filename: str | None = None
    gated: bool = False
    default: bool = False
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("vlm", "vfm"):
            raise ValueError(f"ModelPreset {self.name!r}: role must be 'vlm' or 'vfm', got {self.role!r}")
        if self.format not in ("transformers", "open_clip", "timm", "meta", "tiny"):
            raise ValueError(f"ModelPreset {self.name!r}: format unknown: {self.format!r}")
        if (self.filename is None) != (self.format not in ("open_clip", "timm")):
            raise ValueError(f"ModelPreset {self.name!r}: filename is needed for open_clip/timm and only for them")
        if self.format == "tiny" and self.source != "builtin":
            raise ValueError(f"ModelPreset {self.name!r}: tiny presets are built in, source must be 'builtin'")


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("clip-b16", "vlm", "openai/clip-vit-base-patch16", "transformers", "MIT",
                    "OpenAI CLIP ViT-B/16, the paper's dense CLIP", default=True),
        # RemoteCLIP is loaded with open_clip's "ViT-B-32"/"ViT-L-14" configs, whose MLPs use GELU, not QuickGELU
        ModelPreset("remoteclip-b32", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                    "RemoteCLIP ViT-B/32 (remote-sensing CLIP; run at 2x resolution to match the 16-px grid)",
                    filename="RemoteCLIP-ViT-B-32.pt", activation="gelu"),
        ModelPreset("remoteclip-l14", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                    "RemoteCLIP ViT-L/14", filename="RemoteCLIP-ViT-L-14.pt", activation="gelu"),
        ModelPreset("georsclip-b32", "vlm", "Zilun/GeoRSCLIP", "open_clip", "see the model card (research use)",
                    "GeoRSCLIP ViT-B/32 trained on RS5M", filename="ckpt/RS5M_ViT-B-32.pt"),
        ModelPreset("dinov3-l16-sat", "vfm", "timm/vit_large_patch16_dinov3.sat493m", "timm", "DINOv3 License",
                    "DINOv3 ViT-L/16 SAT-493M, ungated timm copy (paper default)", filename="model.safetensors",
                    default=True),
        ModelPreset("dinov3-l16-sat-meta", "vfm", "facebook/dinov3-vitl16-pretrain-sat493m", "transformers",
                    "DINOv3 License", "DINOv3 ViT-L/16 SAT-493M, Meta's gated transformers repository",
                    gated=True),
        ModelPreset("dinov3-h16plus-lvd", "vfm", "timm/vit_huge_plus_patch16_dinov3.lvd1689m", "timm",
                    "DINOv3 License", "DINOv3 ViT-H+/16 LVD-1689M, ungated timm copy (paper: UAVid, VDD)",
                    filename="model.safetensors"),
        ModelPreset("dinov2-l14", "vfm", "facebook/dinov2-large", "transformers", "Apache-2.0",
                    "DINOv2 ViT-L/14 (ungated alternative VFM; not in the paper)"),
        ModelPreset("tiny-random", "vlm", "builtin", "tiny", "Apache-2.0",
                    "seeded random tiny CLIP, offline smoke tests only: labels are meaningless"),
        ModelPreset("tiny-random-vfm", "vfm", "builtin", "tiny", "Apache-2.0",
                    "seeded random tiny DINOv3, offline smoke tests only: features are meaningless"),
    )
}


# what a transformers repository needs; the other weight formats (TF, Flax, ONNX) are never fetched
_TRANSFORMERS_FILES = ["*.json", "*.txt", "model*.safetensors"]
_TRANSFORMERS_PICKLE_FILES = ["*.json", "*.txt", "pytorch_model*.bin"]
_TOKENIZER_FILES = ["*.json", "*.txt"]


def get_preset(name: str, role: Role | None = None) -> ModelPreset:
    """The preset called ``name`` (of ``role`` when given); ``tiny-random`` resolves to the tiny model of the role.

    Raises:
        InputError: no such preset (or one of the other role); the message lists the valid names.
    """
    if role == "vfm" and name == "tiny-random":
        name = "tiny-random-vfm"
    preset = PRESETS.get(name)
    if preset is not None and (role is None or preset.role == role):
        return preset
    names = ", ".join(p.name for p in PRESETS.values() if role is None or p.role == role)
    if preset is not None:
        raise InputError(f"{name!r} is a {preset.role} preset, not a {role} one", hint=f"{role} presets: {names}")
    raise InputError(f"unknown model preset {name!r}", hint=f"use one of: {names}; or a local path / hub id")


def default_preset(role: Role) -> ModelPreset:
    """The preset the paper uses for ``role`` (CLIP ViT-B/16, DINOv3 ViT-L/16 SAT-493M)."""
    return next(p for p in PRESETS.values() if p.role == role and p.default)


def is_preset(name: str, role: Role) -> bool:
    """True when ``name`` is a preset of ``role`` (``tiny-random`` is one for both roles)."""
    return name in PRESETS and (PRESETS[name].role == role or (role == "vfm" and name == "tiny-random"))


def download(name: str) -> Path:
    """Fetch a preset's files into the Hugging Face cache; return the checkpoint file (open_clip) or folder.

    The files are those the loaders read, so that :func:`load_vlm` / :func:`load_vfm` work offline afterwards:
    open_clip presets also fetch the default CLIP tokenizer; timm presets their ``config.json``.

    Raises:
        InputError: unknown or built-in preset.
        ModelLoadError: gated repository, no network and not cached, ...
    """
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}",
                         hint=f"download one of: {', '.join(PRESETS)} (see `coninfer models list`)")
    preset = PRESETS[name]
    if preset.format == "tiny":
        raise InputError(f"{name} is built in and needs no download",
                         hint=f"use it directly, e.g. --{preset.role} {name}")
    if preset.format == "open_clip":
        from coninfer.encoders.load_clip import DEFAULT_TOKENIZER

        checkpoint = hub_download(preset.source, preset.filename)
        hub_snapshot(DEFAULT_TOKENIZER, allow_patterns=_TOKENIZER_FILES)  # open_clip files carry no tokenizer
        return checkpoint
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
    ``owner/name/file.pt``). ``clip_options`` go to :func:`coninfer.encoders.load_clip.load_clip`.

    Raises:
        ModelLoadError: not a preset, an existing path nor a hub id; not downloadable; not a CLIP checkpoint.
    """
    from coninfer.encoders.clip import build_tiny_clip
    from coninfer.encoders.load_clip import load_clip
    from coninfer.settings import DenseCLIPSettings

    if not is_preset(name_or_path, "vlm"):
        _check_source(name_or_path, "vlm")
        return load_clip(name_or_path, device=device, dtype=dtype, **clip_options)
    preset = get_preset(name_or_path, "vlm")
    if preset.format == "tiny":
        settings = clip_options.get("settings")
        if isinstance(settings, str):
            settings = DenseCLIPSettings.for_variant(settings)
        return build_tiny_clip(seed=0, settings=settings).to(device=device, dtype=dtype or torch.float32)
    if clip_options.get("activation") is None and preset.activation is not None:
        clip_options["activation"] = preset.activation
    # open_clip presets are one file of a repository; transformers presets are the repository
    source: str | Path = download(preset.name) if preset.format == "open_clip" else preset.source
    return load_clip(source, device=device, dtype=dtype, **clip_options)


def load_vfm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **vfm_options):
    """A DenseVFM from a preset name, a local file/folder, or a hub id. ``vfm_options`` go to
    :func:`coninfer.encoders.load_vfm.load_vfm`.

    Raises:
        ModelLoadError: not a preset, an existing path nor a hub id; not downloadable; not a DINOv3/v2 checkpoint.
    """
    from coninfer.encoders.dinov3 import build_tiny_dinov3
    from coninfer.encoders.load_vfm import load_vfm as load_vfm_source

    if not is_preset(name_or_path, "vfm"):
        _check_source(name_or_path, "vfm")
        return load_vfm_source(name_or_path, device=device, dtype=dtype, **vfm_options)
    preset = get_preset(name_or_path, "vfm")
    if preset.format == "tiny":
        return build_tiny_dinov3(seed=0).to_runtime(device, dtype)
    # timm presets: the repository's model.safetensors + config.json; transformers presets: the repository
    if vfm_options.get("format") is None:
        vfm_options["format"] = preset.format
    return load_vfm_source(preset.source, device=device, dtype=dtype, **vfm_options)


def _check_source(source: str, role: Role) -> None:
    """Reject a string that is neither a preset of ``role``, an existing path, nor shaped like a hub id.

    Hub ids are ``owner/name`` (a repository) or, for CLIP, ``owner/name/path/file.pt`` (one file of it);
    anything that starts like a local path (``/``, ``.``, ``~``) or has no ``/`` must exist on disk.
    """
    if Path(source).expanduser().exists():
        return
    names = ", ".join(p.name for p in PRESETS.values() if p.role == role or p.name == "tiny-random")
    hint = f"{role} presets: {names} (see `coninfer models list`); or pass an existing local path"
    if source in PRESETS:
        raise ModelLoadError(f"--{role} {source!r} is a {PRESETS[source].role} preset, not a {role} one", hint=hint)
    looks_local = source.startswith(("/", ".", "~", "\\")) or "/" not in source
    too_deep = role == "vfm" and source.count("/") > 1  # the VFM loader takes whole repositories only
    if looks_local or too_deep or source.endswith("/") or "//" in source:
        raise ModelLoadError(f"--{role} {source!r} is neither a preset, an existing file/folder, nor a hub id",
                             hint=hint)
