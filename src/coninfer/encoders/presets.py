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

    def __post_init__(self) -> None:
        if self.role not in ("vlm", "vfm"):
            raise ValueError(f"ModelPreset.role must be 'vlm' or 'vfm', got {self.role!r}")
        if self.format not in ("transformers", "open_clip", "timm", "meta", "tiny"):
            raise ValueError(f"ModelPreset.format unknown: {self.format!r}")


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("clip-b16", "vlm", "openai/clip-vit-base-patch16", "transformers", "MIT",
                    "OpenAI CLIP ViT-B/16, the paper's dense CLIP", default=True),
        ModelPreset("remoteclip-b32", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                    "RemoteCLIP ViT-B/32 (remote-sensing CLIP; run at 2x resolution to match the 16-px grid)",
                    filename="RemoteCLIP-ViT-B-32.pt"),
        ModelPreset("remoteclip-l14", "vlm", "chendelong/RemoteCLIP", "open_clip", "Apache-2.0",
                    "RemoteCLIP ViT-L/14", filename="RemoteCLIP-ViT-L-14.pt"),
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


def get_preset(name: str, role: Role | None = None) -> ModelPreset:
    """The preset called ``name``; ``tiny-random`` resolves to the tiny model of the requested role."""
    if role == "vfm" and name == "tiny-random":
        name = "tiny-random-vfm"
    preset = PRESETS.get(name)
    if preset is None or (role is not None and preset.role != role):
        names = ", ".join(p.name for p in PRESETS.values() if role is None or p.role == role)
        raise InputError(f"unknown model preset {name!r}", hint=f"use one of: {names}; or a local path / hub id")
    return preset


def default_preset(role: Role) -> ModelPreset:
    return next(p for p in PRESETS.values() if p.role == role and p.default)


def is_preset(name: str, role: Role) -> bool:
    return name in PRESETS and (PRESETS[name].role == role or (role == "vfm" and name == "tiny-random"))


def download(name: str) -> Path:
    """Fetch a preset's files into the Hugging Face cache and return the local path."""
    preset = get_preset(name)
    if preset.format == "tiny":
        raise InputError(f"{name} is built in and needs no download")
    if preset.filename:
        path = hub_download(preset.source, preset.filename)
        if preset.format == "timm":
            # timm repositories carry their architecture in config.json next to the weights
            hub_download(preset.source, "config.json")
        return path
    return hub_snapshot(preset.source)


def load_vlm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **clip_options):
    """A DenseCLIP from a preset name, a local file/folder, or a hub id."""
    from coninfer.encoders.clip import build_tiny_clip
    from coninfer.encoders.convert_clip import load_clip

    if is_preset(name_or_path, "vlm"):
        preset = get_preset(name_or_path, "vlm")
        if preset.format == "tiny":
            model = build_tiny_clip(seed=0, settings=clip_options.get("settings"))
            return model.to(device=device, dtype=dtype or torch.float32)
        source: str | Path = download(name_or_path) if preset.filename else preset.source
        return load_clip(source, device=device, dtype=dtype, **clip_options)
    _check_source(name_or_path, "--vlm")
    return load_clip(name_or_path, device=device, dtype=dtype, **clip_options)


def load_vfm(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **vfm_options):
    """A DenseVFM from a preset name, a local file/folder, or a hub id."""
    from coninfer.encoders.convert_dinov3 import load_vfm as load_vfm_source
    from coninfer.encoders.dinov3 import build_tiny_dinov3

    if is_preset(name_or_path, "vfm"):
        preset = get_preset(name_or_path, "vfm")
        if preset.format == "tiny":
            return build_tiny_dinov3(seed=0).to_runtime(device, dtype)
        return load_vfm_source(preset.source, device=device, dtype=dtype, **vfm_options)
    _check_source(name_or_path, "--vfm")
    return load_vfm_source(name_or_path, device=device, dtype=dtype, **vfm_options)


def _check_source(source: str, option: str) -> None:
    """Reject a string that is neither a preset, an existing path, nor shaped like a hub id.

    Hub ids are ``owner/name`` (a repository) or ``owner/name/path/file.pt`` (one file of it); anything that
    starts like a local path (``/``, ``.``, ``~``) or has no ``/`` must exist on disk.
    """
    if Path(source).expanduser().exists():
        return
    looks_local = source.startswith(("/", ".", "~", "\\")) or "/" not in source
    if looks_local or source.endswith("/") or "//" in source:
        raise ModelLoadError(
            f"{option} {source!r} is neither a preset, an existing file/folder, nor a hub id",
            hint="run `coninfer models list` for presets, or pass an existing local path",
        )
