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
from coninfer.encoders.convert_dinov3 import _strip_backbone_prefix, meta_to_timm, timm_to_transformers
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

_HEADS_BY_TIMM_ARCH = {"vit_small_plus": 6, "vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_huge_plus": 20,
                       "vit_7b": 32}


# --------------------------------------------------------------------------------------------- entry points


def load_vfm(source: str | Path, *, format: str | None = None, device: str | torch.device = "cpu",  # noqa: A002
             dtype: torch.dtype | str | None = None, normalization: Normalization | str | None = None,
             num_heads: int | None = None, revision: str | None = None) -> DenseVFM:
    """Load a DINOv3/DINOv2 model from a hub id, a folder or a checkpoint file, ready for ``dense_features``.

    ``format`` (``transformers``, ``timm``, ``meta``) is detected when None. ``normalization`` overrides the pixel
    statistics recorded with the weights (module docstring). ``num_heads`` is needed only for widths outside
    :data:`~coninfer.encoders.convert_dinov3.HEADS_BY_WIDTH` without a config. The model is float32 on the CPU and
    float16 on CUDA unless ``dtype`` says otherwise. ``fingerprint``: :func:`~coninfer.encoders.checkpoints.weights_fingerprint` of the source
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


# --------------------------------------------------------------------------------------------- helpers


def _normalization(explicit: Normalization | str | None, recorded: Normalization | None,
                   source: str) -> Normalization:
    """``explicit``, else what the weights recorded, else ImageNet's statistics with a warning."""
    if explicit is None and recorded is None:
        logger.warning("%s records no pixel statistics; using ImageNet's. Pass normalization='sat493m' (or convert "
                       "it with `coninfer models convert --normalization sat493m`) for SAT-493M weights", source)
    return resolve_normalization(explicit, recorded or IMAGENET)


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
