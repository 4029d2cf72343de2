"""Load CLIP checkpoints of every common format into :class:`DenseCLIP`, and save them back.

Sources accepted by :func:`load_clip`:

* a Hugging Face hub id (``openai/clip-vit-base-patch16``) or a local transformers folder (``config.json`` +
  weights, optionally tokenizer files);
* an OpenAI / open_clip state dict file (``.pt``/``.pth``/``.bin``/``.safetensors``, OpenAI's TorchScript
  archives included), local or on the hub as ``owner/repo/path/in/repo.pt`` — the format RemoteCLIP, GeoRSCLIP
  and SkyCLIP ship. Sizes are read from tensor shapes; what shapes cannot tell is passed explicitly:

  - ``heads``/``text_heads``: default width / 64 (OpenAI and open_clip ViTs use 64-wide heads);
  - ``activation``: default ``quick_gelu``. OpenAI's weights and the remote-sensing models fine-tuned from them
    (RemoteCLIP, GeoRSCLIP, SkyCLIP) use QuickGELU; open_clip models trained from scratch (LAION, DataComp)
    use exact GELU: pass ``activation="gelu"`` for those. A wrong activation gives plausible-looking but worse
    features, nothing in the file can tell.

A visual-only state dict loads as a vision-only model (``encode_text`` then raises a clear error).

Pixel statistics: the ``normalization`` argument (a preset passes its own), else a transformers folder's
``preprocessor_config.json``, else OpenAI's CLIP statistics (those of every CLIP preset). The loaders of the vlm
presets' formats are registered here (:func:`coninfer.encoders.register_loader`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from coninfer.encoders import register_loader
from coninfer.encoders.checkpoints import (
    StateDict,
    hub_download,
    hub_snapshot,
    load_into,
    load_state_dict,
    weights_fingerprint,
)
from coninfer.encoders.clip import DenseCLIP, check_tokenizer
from coninfer.encoders.normalization import (
    OPENAI_CLIP,
    Normalization,
    normalization_from_mapping,
    resolve_normalization,
)
from coninfer.errors import CheckpointFormatError, InputError, InputFileError, ModelLoadError, OutputError
from coninfer.settings import DenseCLIPSettings

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_TOKENIZER = DEFAULT_CLIP
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
ACTIVATIONS = ("quick_gelu", "gelu")
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # metadata in OpenAI files
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

# open_clip name -> transformers name, per transformer block (the fused in_proj is split separately).
_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_VISION_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT_KEYS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def load_clip(
    source: str | Path = DEFAULT_CLIP,
    *,
    settings: DenseCLIPSettings | str | None = None,
    heads: int | None = None,
    text_heads: int | None = None,
    activation: str | None = None,
    tokenizer: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    normalization: Normalization | str | None = None,
) -> DenseCLIP:
    """Load a CLIP checkpoint as :class:`DenseCLIP` in eval mode on ``device``.

    settings: a :class:`DenseCLIPSettings` or a variant name (``"segearth"``: the paper's Table-2 config).
    tokenizer: folder or hub id of the tokenizer; default: the checkpoint's own, else ``openai/clip-vit-base-patch16``.
    dtype: default float32 on CPU, float16 on CUDA.
    normalization: pixel statistics overriding those recorded with the weights (module docstring).
    The result's ``fingerprint`` is :func:`~coninfer.encoders.checkpoints.weights_fingerprint` of the weights.
    """
    if isinstance(settings, str):
        settings = DenseCLIPSettings.for_variant(settings)
    if activation is not None and activation not in ACTIVATIONS:
        raise InputError(f"activation: {activation!r} is not supported", hint=f"choose one of {', '.join(ACTIVATIONS)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device} requested but CUDA is not available", hint="use --device cpu")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    text = str(source)
    path = Path(text).expanduser()
    folder = weights = None  # a transformers folder, or one checkpoint file
    repo_id = None
    if path.is_dir():
        folder, name = path, path.resolve().name
    elif path.is_file() or _looks_local(text):
        if not path.is_file():
            raise InputFileError(f"CLIP checkpoint not found: {path}", hint="check the path, or pass a hub id")
        weights, name = path, path.stem
    elif text.count("/") >= 2 and text.endswith(CHECKPOINT_SUFFIXES):
        repo_id, filename = "/".join(text.split("/")[:2]), "/".join(text.split("/")[2:])
        weights, name = hub_download(repo_id, filename, revision=revision), text
    else:
        repo_id, name = text, text
        folder = hub_snapshot(text, revision=revision, allow_patterns=["*.json", "*.txt", "model*.safetensors"])
        if not any(folder.glob("*.safetensors")):  # older repositories only have the pickle weights
            folder = hub_snapshot(text, revision=revision, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"])
    recorded = None
    if folder is not None:
        model, tokenizer_object = _load_transformers_folder(folder, tokenizer, activation)
        recorded = normalization_from_mapping(_read_json(folder / "preprocessor_config.json"), name=name)
    else:
        model, tokenizer_object = _load_open_clip_file(weights, tokenizer, heads, text_heads, activation, revision)
    model = model.to(device=device, dtype=dtype)
    return DenseCLIP(model, tokenizer_object, settings=settings, name=name,
                     normalization=resolve_normalization(normalization, recorded or OPENAI_CLIP),
                     fingerprint=weights_fingerprint(folder if folder is not None else weights, repo_id=repo_id))


@register_loader("vlm", "transformers")
def load_clip_preset(preset, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     normalization: Normalization | str | None = None, **clip_options) -> DenseCLIP:
    """A transformers vlm preset: :func:`load_clip` of its hub repository."""
    return load_clip(preset.source, device=device, dtype=dtype, **_preset_options(preset, normalization, clip_options))


@register_loader("vlm", "open_clip")
def load_open_clip_preset(preset, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                          normalization: Normalization | str | None = None, **clip_options) -> DenseCLIP:
    """An open_clip vlm preset: its one checkpoint file (fetched with the default tokenizer), then :func:`load_clip`."""
    from coninfer.encoders.presets import download

    return load_clip(download(preset.name, preset.role), device=device, dtype=dtype,
                     **_preset_options(preset, normalization, clip_options))


def _preset_options(preset, normalization: Normalization | str | None, clip_options: dict) -> dict:
    """``clip_options`` completed with the preset's activation and pixel statistics where not given."""
    options = dict(clip_options)
    if options.get("activation") is None and preset.activation is not None:
        options["activation"] = preset.activation
    if normalization is not None or preset.normalization is not None:
        options["normalization"] = normalization if normalization is not None else preset.normalization
    return options


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(f"cannot read {path} as json: {error}") from error
    return content if isinstance(content, dict) else {}


def load_tokenizer(source: str | Path):
    """A CLIP tokenizer from a local folder or a hub id, checked with :func:`check_tokenizer`."""
    from transformers import CLIPTokenizer

    path = Path(str(source)).expanduser()
    if not path.is_dir():
        # Fetched first: CLIPTokenizer.from_pretrained on an uncached hub id offline returns a broken tokenizer
        # instead of failing, and the snapshot's error says what actually went wrong.
        path = hub_snapshot(str(source), allow_patterns=["*.json", "*.txt"])
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{source} holds no CLIP tokenizer files ({' or '.join(_TOKENIZER_FILES)})",
                             hint="pass a folder saved with tokenizer.save_pretrained, or a hub id")
    tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    check_tokenizer(tokenizer, str(source))
    return tokenizer


def save_clip_transformers(dense: DenseCLIP, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``dense``'s model and tokenizer as a transformers folder that :func:`load_clip` reads back, with its
    pixel statistics in ``preprocessor_config.json`` (CLIPImageProcessor's fields)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputError(f"{folder} exists and is not empty", hint="choose a new folder or pass overwrite=True")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dense.model.save_pretrained(str(folder))
        if dense.tokenizer is not None:
            dense.tokenizer.save_pretrained(str(folder))
        processor = {"image_processor_type": "CLIPImageProcessor", "do_normalize": True,
                     "image_mean": list(dense.normalization.mean), "image_std": list(dense.normalization.std)}
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=1) + "\n", encoding="utf-8")
    except OSError as error:
        raise OutputError(f"cannot write {folder}: {error}", hint="check the folder's permissions and free space") from error
    return folder


def convert_open_clip_state_dict(state_dict: StateDict, *, heads: int | None = None, text_heads: int | None = None,
                                 activation: str | None = None, eos_token_id: int = 49407, bos_token_id: int = 49406,
                                 pad_token_id: int | None = None, source: str = "checkpoint") -> torch.nn.Module:
    """Build a transformers ``CLIPModel`` (``CLIPVisionModelWithProjection`` if there is no text tower) from an
    OpenAI/open_clip state dict, sizes inferred from shapes. Shape or key mismatches raise CheckpointFormatError."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    state_dict = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    if "visual.conv1.weight" not in state_dict or "visual.proj" not in state_dict:
        hint = ("this looks like a transformers state dict: pass the folder with its config.json"
                if any(k.startswith("vision_model.") for k in state_dict)
                else "only ViT CLIP checkpoints in OpenAI/open_clip format are supported (no ResNet CLIP)")
        raise CheckpointFormatError(f"{source}: no 'visual.conv1.weight'/'visual.proj' tensors", hint=hint)
    activation = activation or "quick_gelu"
    vision = _vision_config(state_dict, heads, activation, source)
    has_text = "token_embedding.weight" in state_dict
    if has_text:
        text = _text_config(state_dict, text_heads, activation, source)
        text.update(eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                    pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id)
        if text["projection_dim"] != vision["projection_dim"]:
            raise CheckpointFormatError(f"{source}: text projection {text['projection_dim']} != visual projection "
                                        f"{vision['projection_dim']}", hint="the towers come from different models")
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"])
        model = _quiet_build(CLIPModel, config)
    else:
        model = _quiet_build(CLIPVisionModelWithProjection, CLIPVisionConfig(**vision))
    text_layers = text["num_hidden_layers"] if has_text else 0
    mapped = _rename(state_dict, _key_map(vision["num_hidden_layers"], text_layers))
    load_into(model, mapped, source=source, ignore_missing=("logit_scale",))
    return model.eval()


def _vision_config(state_dict: StateDict, heads: int | None, activation: str, source: str) -> dict:
    conv = state_dict["visual.conv1.weight"]  # (width, 3, patch, patch)
    width, _, patch, _ = conv.shape
    positions = state_dict["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise CheckpointFormatError(f"{source}: {positions - 1} visual positions are not a square grid")
    return {
        "hidden_size": width, "num_hidden_layers": _count_blocks(state_dict, "visual.transformer.resblocks."),
        "num_attention_heads": _heads(width, heads, "heads", source), "patch_size": patch, "image_size": grid * patch,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "projection_dim": state_dict["visual.proj"].shape[1], "hidden_act": activation, "layer_norm_eps": 1e-5,
    }


def _text_config(state_dict: StateDict, heads: int | None, activation: str, source: str) -> dict:
    vocab_size, width = state_dict["token_embedding.weight"].shape
    return {
        "vocab_size": vocab_size, "hidden_size": width, "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, "transformer.resblocks."),
        "num_attention_heads": _heads(width, heads, "text_heads", source),
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "projection_dim": state_dict["text_projection"].shape[1], "hidden_act": activation, "layer_norm_eps": 1e-5,
    }


def _heads(width: int, heads: int | None, field: str, source: str) -> int:
    if heads is None:
        if width % 64:
            raise CheckpointFormatError(f"{source}: width {width} is not a multiple of 64, cannot guess the heads",
                                        hint=f"pass {field}= explicitly")
        return width // 64
    if heads <= 0 or width % heads:
        raise InputError(f"{field}: {heads} does not divide the width {width}", hint=f"pass a divisor of {width}")
    return heads


def _count_blocks(state_dict: StateDict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if not indices or indices != set(range(len(indices))):
        raise CheckpointFormatError(f"transformer blocks under {prefix!r} are missing or not numbered 0..n-1")
    return len(indices)


def _key_map(vision_layers: int, text_layers: int) -> dict[str, str]:
    """open_clip name -> transformers name for everything but the fused in_proj and the projections."""
    mapping = dict(_VISION_KEYS)
    for index in range(vision_layers):
        for old, new in _BLOCK_KEYS.items():
            mapping[f"visual.transformer.resblocks.{index}.{old}"] = f"vision_model.encoder.layers.{index}.{new}"
    if text_layers:
        mapping.update(_TEXT_KEYS)
        for index in range(text_layers):
            for old, new in _BLOCK_KEYS.items():
                mapping[f"transformer.resblocks.{index}.{old}"] = f"text_model.encoder.layers.{index}.{new}"
    return mapping


def _rename(state_dict: StateDict, mapping: dict[str, str]) -> StateDict:
    """Rename to transformers keys; split in_proj into q/k/v; transpose the projections. Unknown keys pass
    through unchanged so that ``load_into`` names them."""
    result: StateDict = {}
    for name, tensor in state_dict.items():
        fused = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name)
        if fused:
            visual, index, kind = fused.groups()
            tower = "vision_model" if visual else "text_model"
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):  # [q | k | v] along the outputs
                result[f"{tower}.encoder.layers.{index}.self_attn.{part}_proj.{kind}"] = chunk.contiguous()
        elif name in ("visual.proj", "text_projection"):
            result["visual_projection.weight" if name == "visual.proj" else "text_projection.weight"] = tensor.T.contiguous()
        else:
            result[mapping.get(name, name)] = tensor
    return result


def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or (text.endswith(CHECKPOINT_SUFFIXES) and text.count("/") < 2)


def _quiet_build(model_class, config):
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG untouched
        return model_class(config)


def _load_open_clip_file(path: Path, tokenizer: str | Path | None, heads: int | None, text_heads: int | None,
                         activation: str | None, revision: str | None):
    state_dict = load_state_dict(path)
    tokenizer_object = None
    if "token_embedding.weight" in state_dict:
        tokenizer_object = load_tokenizer(tokenizer if tokenizer is not None else DEFAULT_TOKENIZER)
    ids = {} if tokenizer_object is None else {"eos_token_id": tokenizer_object.eos_token_id,
                                               "bos_token_id": tokenizer_object.bos_token_id,
                                               "pad_token_id": tokenizer_object.pad_token_id}
    model = convert_open_clip_state_dict(state_dict, heads=heads, text_heads=text_heads, activation=activation,
                                         source=str(path), **ids)
    return model, tokenizer_object


def _load_transformers_folder(folder: Path, tokenizer: str | Path | None, activation: str | None):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointFormatError(f"{folder} has no config.json", hint="pass a transformers folder or a checkpoint file")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    classes = {"clip": (CLIPModel, CLIPConfig), "clip_vision_model": (CLIPVisionModelWithProjection, CLIPVisionConfig)}
    if model_type not in classes:
        raise CheckpointFormatError(f"{folder}: model_type {model_type!r} is not a CLIP model",
                                    hint="pass a CLIP checkpoint (model_type 'clip')")
    model_class, config_class = classes[model_type]
    config = config_class.from_pretrained(str(folder))
    if activation is not None:
        for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None), config):
            if sub is not None and hasattr(sub, "hidden_act"):
                sub.hidden_act = activation
    try:
        model, info = model_class.from_pretrained(str(folder), config=config, local_files_only=True,
                                                  output_loading_info=True)
    except OSError as error:
        raise CheckpointFormatError(f"cannot load the weights in {folder}: {error}",
                                    hint="the folder needs model.safetensors or pytorch_model.bin") from error
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("mismatched_keys"):
        detail = f"missing {missing[0]!r}" if missing else f"mismatched {info['mismatched_keys'][0]}"
        raise CheckpointFormatError(f"{folder}: weights do not match the config ({detail})",
                                    hint="re-save the model with save_pretrained")
    tokenizer_object = None
    if model_type == "clip":
        has_files = any((folder / name).is_file() for name in _TOKENIZER_FILES)
        source = tokenizer if tokenizer is not None else (folder if has_files else DEFAULT_TOKENIZER)
        tokenizer_object = load_tokenizer(source)
    return model.eval(), tokenizer_object
