"""Load DINOv3 (DINOv2, other transformers ViTs) weights from every format into a :class:`DenseVFM`.

Sources understood by :func:`load_vfm`:

* a hub id or local folder in transformers format (``facebook/dinov3-vitl16-pretrain-sat493m``, gated;
  ``facebook/dinov2-large``; any ViT backbone with ``patch_size`` in its config), or a folder written by
  :func:`save_vfm_transformers`;
* a timm copy: hub repo ``timm/vit_large_patch16_dinov3.sat493m`` (ungated, the default source), a local timm
  folder, or a local timm ``.safetensors``/``.pth`` file;
* Meta's original ``.pth`` (``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth``).

Meta keys are first renamed to timm's names, then timm's names are mapped to transformers'; the rules are those of
the golden TIMM_DINOV3.md (sections 4 and 5). There are no transposes: q/k/v are row splits of the fused qkv.
Meta checkpoints carry their RoPE periods (``rope_embed.periods``); they are kept so outputs match Meta's code.

Pixel statistics come from, in order: the ``normalization`` argument (a preset passes its own), a saved
``coninfer_vfm.json``, a timm ``config.json`` (``pretrained_cfg``), a transformers ``preprocessor_config.json``;
when none records them (a bare Meta ``.pth``), ImageNet's, with a warning. The loaders of the vfm presets'
formats are registered here (:func:`coninfer.encoders.register_loader`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from coninfer.encoders import register_loader
from coninfer.encoders.checkpoints import (
    StateDict,
    hub_download,
    hub_errors,
    load_into,
    load_state_dict,
    weights_fingerprint,
)
from coninfer.encoders.dinov3 import DenseVFM
from coninfer.encoders.normalization import (
    IMAGENET,
    Normalization,
    normalization_from_mapping,
    resolve_normalization,
)
from coninfer.errors import CheckpointFormatError, InputError, InputFileError, ModelLoadError, OutputError

logger = logging.getLogger(__name__)

DEFAULT_DINOV3_SOURCE = "timm/vit_large_patch16_dinov3.sat493m"
FORMATS = ("transformers", "timm", "meta")
CONINFER_JSON = "coninfer_vfm.json"
PREPROCESSOR_JSON = "preprocessor_config.json"

# Heads cannot be read from tensor shapes (only the product heads * head_dim can): the released widths.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
_HEADS_BY_TIMM_ARCH = {"vit_small_plus": 6, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_huge_plus": 20,
                       "vit_7b": 32}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_META_BLOCK_RENAMES = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2", "mlp.w1.weight": "mlp.fc1_g.weight",
                       "mlp.w1.bias": "mlp.fc1_g.bias", "mlp.w2.weight": "mlp.fc1_x.weight",
                       "mlp.w2.bias": "mlp.fc1_x.bias", "mlp.w3.weight": "mlp.fc2.weight", "mlp.w3.bias": "mlp.fc2.bias"}
_TIMM_BLOCK_TO_HF = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                     "norm2.bias": "norm2.bias", "attn.proj.weight": "attention.o_proj.weight",
                     "attn.proj.bias": "attention.o_proj.bias", "attn.q_bias": "attention.q_proj.bias",
                     "attn.k_bias": "attention.k_proj.bias", "attn.v_bias": "attention.v_proj.bias",
                     "gamma_1": "layer_scale1.lambda1", "gamma_2": "layer_scale2.lambda1"}
_TIMM_MLP_TO_HF = {"fc1": "up_proj", "fc2": "down_proj"}
_TIMM_SWIGLU_TO_HF = {"fc1_g": "gate_proj", "fc1_x": "up_proj", "fc2": "down_proj"}
_TIMM_TOP_TO_HF = {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
                   "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
                   "patch_embed.proj.bias": "embeddings.patch_embeddings.bias", "norm.weight": "norm.weight",
                   "norm.bias": "norm.bias", "mask_token": "embeddings.mask_token"}


@dataclass(frozen=True)
class MetaExtras:
    """What a Meta checkpoint holds beyond timm's keys: RoPE periods (Dh/4,) and the mask token (1, C)."""

    rope_periods: torch.Tensor | None
    mask_token: torch.Tensor | None


# --------------------------------------------------------------------------------------------- entry points


def load_vfm(source: str | Path, *, format: str | None = None, device: str | torch.device = "cpu",  # noqa: A002
             dtype: torch.dtype | str | None = None, normalization: Normalization | str | None = None,
             num_heads: int | None = None, revision: str | None = None) -> DenseVFM:
    """Load a DINOv3/DINOv2 model from a hub id, a folder or a checkpoint file, ready for ``dense_features``.

    ``format`` (``transformers``, ``timm``, ``meta``) is detected when None. ``normalization`` overrides the pixel
    statistics recorded with the weights (module docstring). ``num_heads`` is needed only for widths outside
    :data:`HEADS_BY_WIDTH` without a config. The model is float32 on the CPU and float16 on CUDA unless ``dtype``
    says otherwise. ``fingerprint``: :func:`~coninfer.encoders.checkpoints.weights_fingerprint` of the source
    (``hub:<repo>@<commit>`` for the hub and its cache, ``local:<digest>`` of paths, sizes and mtimes otherwise).
    """
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown checkpoint format {format!r}", hint=f"use one of {', '.join(FORMATS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} requested but CUDA is not available", hint="use --device cpu")
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        vfm = _load_local(path, format=format, normalization=normalization, num_heads=num_heads)
        vfm.fingerprint = weights_fingerprint(path)
    elif _looks_like_path(text):
        raise InputFileError(f"model source not found: {text}", hint="check the path, or give a hub id or preset")
    else:
        vfm = _load_hub(text, format=format, normalization=normalization, num_heads=num_heads, revision=revision)
    return vfm.to_runtime(device, dtype)


def load_timm_dinov3(source: str | Path = DEFAULT_DINOV3_SOURCE, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None, normalization: Normalization | str | None = None,
                     num_heads: int | None = None, revision: str | None = None) -> DenseVFM:
    """Load a timm DINOv3 copy: a hub repo id (``timm/vit_huge_plus_patch16_dinov3.lvd1689m``), folder or file."""
    return load_vfm(source, format="timm", device=device, dtype=dtype, normalization=normalization,
                    num_heads=num_heads, revision=revision)


@register_loader("vfm", "transformers")
@register_loader("vfm", "timm")
@register_loader("vfm", "meta")
def load_vfm_preset(preset, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    format: str | None = None, normalization: Normalization | str | None = None,  # noqa: A002
                    **options) -> DenseVFM:
    """A vfm preset: :func:`load_vfm` of its source in its format, with its pixel statistics unless overridden."""
    return load_vfm(preset.source, format=format or preset.format, device=device, dtype=dtype,
                    normalization=normalization if normalization is not None else preset.normalization, **options)


def save_vfm_transformers(vfm: DenseVFM, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``vfm`` as a transformers folder (``save_pretrained``) plus ``coninfer_vfm.json``.

    The json keeps what transformers' config cannot: the pixel normalisation and any RoPE periods taken from a
    Meta checkpoint, so that :func:`load_vfm` on the folder gives identical outputs.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputError(f"{folder} exists and is not empty", hint="choose a new folder or pass overwrite=True")
    folder.mkdir(parents=True, exist_ok=True)
    vfm.model.save_pretrained(str(folder), safe_serialization=True)
    periods = vfm.custom_rope_periods  # recomputable periods are left to transformers
    meta = {"format_version": 1, "name": vfm.name, "normalization": vfm.normalization.as_dict(),
            "rope_periods": None if periods is None else [float(p) for p in periods.tolist()]}
    (folder / CONINFER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


# --------------------------------------------------------------------------------------------- dispatch


def _load_local(path: Path, *, format: str | None, normalization: Normalization | str | None,  # noqa: A002
                num_heads: int | None) -> DenseVFM:
    if path.is_dir():
        config = _read_json(path / "config.json")
        if format == "transformers" or (format is None and ("model_type" in config or (path / CONINFER_JSON).exists())):
            return _load_transformers(str(path), normalization=normalization, local_folder=path)
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None or format == "meta":
            raise CheckpointFormatError(f"{path} is not a transformers or timm model folder",
                                        hint="pass the checkpoint file itself, or a folder with config.json")
        return _load_timm_file(weights, config, normalization=normalization, num_heads=num_heads,
                               name=str(config.get("pretrained_cfg", {}).get("hf_hub_id") or path.name))
    state_dict = _strip_backbone_prefix(load_state_dict(path))
    kind = format or detect_format(state_dict, source=str(path))
    if kind == "meta":
        return _from_meta(state_dict, name=path.name, normalization=normalization, num_heads=num_heads)
    if kind == "timm":
        sibling = _read_json(path.parent / "config.json")
        config = sibling if "architecture" in sibling or "pretrained_cfg" in sibling else {}
        return _load_timm_file(path, config, normalization=normalization, num_heads=num_heads, name=path.name,
                               state_dict=state_dict)
    raise CheckpointFormatError(f"{path} is a bare transformers state dict without its config",
                                hint="pass the folder holding config.json and the weights")


def _load_hub(repo_id: str, *, format: str | None, normalization: Normalization | str | None,  # noqa: A002
              num_heads: int | None, revision: str | None) -> DenseVFM:
    if format == "meta":
        raise InputError(f"Meta-format checkpoints are local .pth files, got hub id {repo_id!r}",
                         hint="download the .pth from Meta and pass its path")
    config_path = hub_download(repo_id, "config.json", revision=revision)
    config = _read_json(config_path)
    is_timm = repo_id.startswith("timm/") or "architecture" in config or "pretrained_cfg" in config
    if format == "timm" or (format is None and is_timm):
        weights = _hub_timm_weights(repo_id, revision)
        vfm = _load_timm_file(weights, config, normalization=normalization, num_heads=num_heads, name=repo_id)
    else:
        recorded = None if normalization is not None else _hub_preprocessor_normalization(repo_id, revision)
        vfm = _load_transformers(repo_id, normalization=normalization, revision=revision, recorded=recorded)
    vfm.fingerprint = weights_fingerprint(config_path, repo_id=repo_id)
    return vfm


def _hub_preprocessor_normalization(repo_id: str, revision: str | None) -> Normalization | None:
    """The statistics of a hub repository's ``preprocessor_config.json``, None when it has none."""
    try:
        content = _read_json(hub_download(repo_id, PREPROCESSOR_JSON, revision=revision))
    except ModelLoadError:  # absent from the repository, or not cached offline
        return None
    return normalization_from_mapping(content, name=repo_id)


def _hub_timm_weights(repo_id: str, revision: str | None) -> Path:
    """timm's loader order: ``model.safetensors``, then ``pytorch_model.bin``."""
    from huggingface_hub import errors as hub

    try:
        return hub_download(repo_id, "model.safetensors", revision=revision)
    except ModelLoadError as error:
        if not isinstance(error.__cause__, hub.EntryNotFoundError):
            raise
    return hub_download(repo_id, "pytorch_model.bin", revision=revision)


def detect_format(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> str:
    """``meta`` or ``timm`` from the key names (or ``transformers`` for a bare transformers state dict)."""
    keys = set(state_dict)
    if keys & {"storage_tokens", "rope_embed.periods"} or any(".ls1.gamma" in k or ".mlp.w1." in k for k in keys):
        return "meta"
    if "reg_token" in keys or any(k.endswith(".gamma_1") for k in keys):
        return "timm"
    if "embeddings.patch_embeddings.weight" in keys:
        return "transformers"
    if "visual.conv1.weight" in keys or any(k.startswith("vision_model.") for k in keys):
        raise CheckpointFormatError(f"{source} is a CLIP checkpoint, not a DINOv3/DINOv2 one",
                                    hint="pass it as the vision-language model (--vlm, or --role vlm)")
    raise CheckpointFormatError(f"{source}: cannot tell the DINOv3 checkpoint format from its keys, e.g. "
                                f"{sorted(keys)[:3]}", hint="pass format='meta', 'timm' or 'transformers'")


# --------------------------------------------------------------------------------------------- transformers


def _load_transformers(source: str, *, normalization: Normalization | str | None, revision: str | None = None,
                       local_folder: Path | None = None, recorded: Normalization | None = None) -> DenseVFM:
    """A transformers ViT backbone (``AutoModel``): any model type whose config has ``patch_size``."""
    from transformers import AutoConfig, AutoModel

    with hub_errors(source):
        config = AutoConfig.from_pretrained(source, revision=revision)
    if getattr(config, "patch_size", None) is None or getattr(config, "hidden_size", None) is None:
        hint = ("pass it as the vision-language model (--vlm)" if "clip" in str(config.model_type)
                else "pass a ViT backbone such as a DINOv3ViTModel / Dinov2Model checkpoint")
        raise ModelLoadError(f"{source} is a {config.model_type!r} model, not a ViT backbone with a patch size",
                             hint=hint)
    with hub_errors(source):
        model = AutoModel.from_pretrained(source, config=config, revision=revision, dtype=torch.float32)
    saved = _read_json(local_folder / CONINFER_JSON) if local_folder is not None else {}
    name = saved.get("name") or source
    if local_folder is not None:
        recorded = (normalization_from_mapping(saved.get("normalization", {}))
                    or normalization_from_mapping(_read_json(local_folder / PREPROCESSOR_JSON), name=name))
    periods = saved.get("rope_periods")
    return DenseVFM(model, name=name, normalization=_normalization(normalization, recorded, name),
                    rope_periods=None if periods is None else torch.tensor(periods, dtype=torch.float32))


# --------------------------------------------------------------------------------------------- timm


def _load_timm_file(path: Path, config: Mapping, *, normalization: Normalization | str | None,
                    num_heads: int | None, name: str, state_dict: StateDict | None = None) -> DenseVFM:
    state_dict = load_state_dict(path) if state_dict is None else state_dict
    if detect_format(state_dict, source=str(path)) == "meta":
        return _from_meta(state_dict, name=name, normalization=normalization, num_heads=num_heads)
    heads = num_heads or _heads_from_json(config)
    hf_config, hf_state = timm_to_transformers(state_dict, num_heads=heads, source=str(path))
    model = build_dinov3_model(hf_config, hf_state, source=str(path))
    recorded = normalization_from_mapping(config.get("pretrained_cfg", {}), name="timm")
    return DenseVFM(model, name=name, normalization=_normalization(normalization, recorded, name))


def timm_to_transformers(state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                         rope_periods: torch.Tensor | None = None, source: str = "timm checkpoint"):
    """Map a timm DINOv3 state dict to ``(DINOv3ViTConfig, state dict with on-disk ``layer.N.`` keys)``.

    Rules (TIMM_DINOV3.md section 4): ``attn.qkv.weight`` (3C, C) is split by rows into q | k | v; absent q/v biases
    become zeros (the released ones are zero); ``reg_token`` -> ``register_tokens``; ``gamma_i`` -> layer scales;
    Mlp ``fc1/fc2`` -> ``up/down_proj``; SwiGLU ``fc1_g/fc1_x/fc2`` -> ``gate/up/down_proj``.
    """
    from transformers import DINOv3ViTConfig

    sizes = _timm_sizes(state_dict, source)
    heads = _resolve_num_heads(sizes["hidden_size"], num_heads, rope_periods, source)
    hidden = sizes["hidden_size"]
    has_k_bias = any(k.endswith("attn.k_bias") and bool(v.abs().max() > 0) for k, v in state_dict.items())
    out: StateDict = {}
    for key, tensor in state_dict.items():
        match = _BLOCK.match(key)
        if match is None:
            if key in _TIMM_TOP_TO_HF:
                out[_TIMM_TOP_TO_HF[key]] = tensor.reshape(1, 1, hidden) if key == "mask_token" else tensor
            elif not key.startswith(("rope.", "head.", "fc_norm.")):
                raise CheckpointFormatError(f"{source}: unexpected key {key!r} for a DINOv3 checkpoint",
                                            hint="is this a DINOv3 ViT (not DINOv2, ConvNeXt or a CLIP)?")
            continue
        index, rest = match.groups()
        prefix = f"layer.{index}."
        if rest == "attn.qkv.weight":
            if tuple(tensor.shape) != (3 * hidden, hidden):
                raise CheckpointFormatError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected "
                                            f"{(3 * hidden, hidden)}")
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.{part}_proj.weight"] = chunk
        elif rest == "attn.k_bias" and not has_k_bias:
            continue
        elif rest in _TIMM_BLOCK_TO_HF:
            out[prefix + _TIMM_BLOCK_TO_HF[rest]] = tensor
        elif rest.startswith("mlp."):
            layer, _, param = rest[len("mlp."):].partition(".")
            table = _TIMM_SWIGLU_TO_HF if sizes["gated"] else _TIMM_MLP_TO_HF
            if layer not in table:
                raise CheckpointFormatError(f"{source}: unexpected FFN key {key!r}",
                                            hint="FFN keys must all be Mlp (fc1, fc2) or all SwiGLU (fc1_g, fc1_x, fc2)")
            out[f"{prefix}mlp.{table[layer]}.{param}"] = tensor
        else:
            raise CheckpointFormatError(f"{source}: unexpected key {key!r} in a DINOv3 block",
                                        hint="the checkpoint is not in timm DINOv3 format")
    for index in range(sizes["depth"]):  # released plain variants dropped their all-zero q/v biases
        for part in "qv":
            out.setdefault(f"layer.{index}.attention.{part}_proj.bias", torch.zeros(hidden))
    out.setdefault("embeddings.mask_token", torch.zeros(1, 1, hidden))
    if sizes["num_register_tokens"] == 0:
        out.setdefault("embeddings.register_tokens", torch.zeros(1, 0, hidden))
    out.setdefault("embeddings.patch_embeddings.bias", torch.zeros(hidden))
    config = DINOv3ViTConfig(
        patch_size=sizes["patch_size"], hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["depth"], num_attention_heads=heads, use_gated_mlp=sizes["gated"],
        hidden_act="silu" if sizes["gated"] else "gelu", num_register_tokens=sizes["num_register_tokens"],
        layer_norm_eps=1e-5, rope_theta=100.0, query_bias=True, key_bias=has_k_bias, value_bias=True,
        proj_bias="blocks.0.attn.proj.bias" in state_dict, mlp_bias=sizes["mlp_bias"], image_size=224)
    return config, out


def _timm_sizes(state_dict: Mapping[str, torch.Tensor], source: str) -> dict:
    """Architecture numbers read from tensor shapes: width, depth, FFN type and hidden size, registers, patch."""
    required = ("cls_token", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointFormatError(f"{source}: missing {missing[0]!r} (keys of a timm/Meta DINOv3 ViT expected)",
                                    hint="is this a DINOv3 ViT checkpoint? ConvNeXt variants are not supported")
    patch_weight = state_dict["patch_embed.proj.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[-1] != patch_weight.shape[-2]:
        raise CheckpointFormatError(f"{source}: patch_embed.proj.weight has shape {tuple(patch_weight.shape)}, "
                                    "expected (C, 3, p, p)")
    hidden = int(patch_weight.shape[0])
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointFormatError(f"{source}: block indices {blocks} are not 0..N-1")
    gated = "blocks.0.mlp.fc1_g.weight" in state_dict
    first = "blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"
    if first not in state_dict:
        raise CheckpointFormatError(f"{source}: no FFN weights in block 0 (looked for {first!r})")
    reg = state_dict.get("reg_token")
    return {"hidden_size": hidden, "depth": len(blocks), "gated": gated, "patch_size": int(patch_weight.shape[-1]),
            "intermediate_size": int(state_dict[first].shape[0]), "mlp_bias": first.replace("weight", "bias") in state_dict,
            "num_register_tokens": 0 if reg is None else int(reg.shape[1])}


def build_dinov3_model(config, hf_state: Mapping[str, torch.Tensor], *, source: str):
    """A ``DINOv3ViTModel`` holding ``hf_state`` (on-disk ``layer.N.`` keys), checked key by key and shape by shape."""
    from transformers import DINOv3ViTModel

    with _no_init_weights():
        model = DINOv3ViTModel(config)
    layer_prefix = _layer_prefix(model)
    renamed = {(layer_prefix + k[len("layer."):] if k.startswith("layer.") else k): v.float()
               for k, v in hf_state.items()}
    load_into(model, renamed, source=source)
    return model.eval()


def _layer_prefix(model: torch.nn.Module) -> str:
    """``model.layer.`` in transformers >= 5.4, ``layer.`` before: read it from the model's own keys."""
    for key in model.state_dict():
        match = re.match(r"^(.*layer\.)0\.norm1\.weight$", key)
        if match:
            return match.group(1)
    raise ModelLoadError("cannot find the layer prefix of DINOv3ViTModel", hint="unsupported transformers version")


# --------------------------------------------------------------------------------------------- Meta


def _from_meta(state_dict: Mapping[str, torch.Tensor], *, name: str, normalization: Normalization | str | None,
               num_heads: int | None) -> DenseVFM:
    timm_state, extras = meta_to_timm(state_dict, source=name)
    if extras.mask_token is not None:
        timm_state["mask_token"] = extras.mask_token
    config, hf_state = timm_to_transformers(timm_state, num_heads=num_heads, rope_periods=extras.rope_periods,
                                            source=name)
    model = build_dinov3_model(config, hf_state, source=name)
    return DenseVFM(model, name=name, normalization=_normalization(normalization, None, name),
                    rope_periods=extras.rope_periods)


def meta_to_timm(state_dict: Mapping[str, torch.Tensor], *, source: str = "Meta checkpoint") -> tuple[StateDict, MetaExtras]:
    """Rename Meta's DINOv3 keys to timm's (TIMM_DINOV3.md section 5); RoPE periods and mask token go to extras.

    ``qkv.bias`` (3C) is multiplied by ``bias_mask`` (Meta zeroes the k third this way) and split into
    ``q_bias`` / ``k_bias`` / ``v_bias``; ``local_cls_norm`` (SAT ViT-L, used only on training crops) is dropped.
    """
    out: StateDict = {}
    periods = mask_token = None
    for key, tensor in state_dict.items():
        match = _BLOCK.match(key)
        if match is None:
            if key == "storage_tokens":
                out["reg_token"] = tensor
            elif key == "rope_embed.periods":
                periods = tensor.float()
            elif key == "mask_token":
                mask_token = tensor.float().reshape(1, 1, -1)
            elif key.startswith("local_cls_norm."):
                continue
            else:
                out[key] = tensor
            continue
        index, rest = match.groups()
        prefix = f"blocks.{index}."
        if rest == "attn.qkv.bias_mask":
            continue
        if rest == "attn.qkv.bias":
            mask = state_dict.get(prefix + "attn.qkv.bias_mask")
            if mask is not None and not bool(torch.isfinite(mask).all()):
                raise CheckpointFormatError(f"{source}: {prefix}attn.qkv.bias_mask holds NaN",
                                            hint="the model was built from scratch, not loaded from trained weights")
            bias = tensor if mask is None else tensor * mask
            if bias.ndim != 1 or bias.numel() % 3:
                raise CheckpointFormatError(f"{source}: {key} has shape {tuple(bias.shape)}, expected (3C,)")
            for part, chunk in zip("qkv", bias.chunk(3), strict=True):
                out[f"{prefix}attn.{part}_bias"] = chunk
        else:
            out[prefix + _META_BLOCK_RENAMES.get(rest, rest)] = tensor
    return out, MetaExtras(rope_periods=periods, mask_token=mask_token)


# --------------------------------------------------------------------------------------------- helpers


def _normalization(explicit: Normalization | str | None, recorded: Normalization | None,
                   source: str) -> Normalization:
    """``explicit``, else what the weights recorded, else ImageNet's statistics with a warning."""
    if explicit is None and recorded is None:
        logger.warning("%s records no pixel statistics; using ImageNet's. Pass normalization='sat493m' (or convert "
                       "it with `coninfer models convert --normalization sat493m`) for SAT-493M weights", source)
    return resolve_normalization(explicit, recorded or IMAGENET)


def _resolve_num_heads(hidden: int, explicit: int | None, periods: torch.Tensor | None, source: str) -> int:
    """Explicit (or config) value, else head_dim from the RoPE periods (Dh/4 of them), else the width table."""
    from_periods = None
    if periods is not None:
        head_dim = 4 * int(periods.numel())
        if head_dim == 0 or hidden % head_dim:
            raise CheckpointFormatError(f"{source}: {periods.numel()} RoPE periods do not fit width {hidden}")
        from_periods = hidden // head_dim
    heads = explicit or from_periods or HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise CheckpointFormatError(f"{source}: cannot infer the number of attention heads for width {hidden}",
                                    hint=f"pass num_heads (known widths: {sorted(HEADS_BY_WIDTH)})")
    if heads <= 0 or hidden % heads or (hidden // heads) % 4:
        raise CheckpointFormatError(f"{source}: num_heads={heads} does not divide width {hidden} into head dims "
                                    "that are multiples of 4", hint="pass the model's real num_heads")
    if from_periods is not None and heads != from_periods:
        raise CheckpointFormatError(f"{source}: num_heads={heads} contradicts the checkpoint's RoPE periods "
                                    f"(head dim {4 * periods.numel()} -> {from_periods} heads)",
                                    hint="drop num_heads or pass the right one")
    return int(heads)


def _heads_from_json(config: Mapping) -> int | None:
    """num_heads from a config json: top level, ``model_args``/``kwargs`` sections, or the timm architecture name."""
    for section in (config, *(config.get(k) for k in ("model_args", "create_model_kwargs", "kwargs",
                                                      "DinoVisionTransformer_kwargs"))):
        if isinstance(section, Mapping) and isinstance(section.get("num_heads"), int):
            return int(section["num_heads"])
    architecture = str(config.get("architecture") or config.get("timm_model_name") or "")
    for stem in sorted(_HEADS_BY_TIMM_ARCH, key=len, reverse=True):
        if architecture.startswith(stem + "_patch"):
            return _HEADS_BY_TIMM_ARCH[stem]
    return None


def _strip_backbone_prefix(state_dict: StateDict) -> StateDict:
    """Meta's training checkpoints nest the ViT under ``backbone.``; the released ones do not."""
    if state_dict and all(key.startswith("backbone.") for key in state_dict):
        return {key[len("backbone."):]: value for key, value in state_dict.items()}
    return state_dict


def _read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(f"cannot read {path} as json: {error}") from error
    return content if isinstance(content, dict) else {}


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text
            or text.endswith((".pth", ".pt", ".bin", ".safetensors")))


def _no_init_weights():
    """Skip random init of a model whose every tensor is overwritten next (seconds saved for ViT-H+)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
