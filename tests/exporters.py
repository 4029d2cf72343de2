"""Test-only exporters and oracles: write models back into the formats the loaders read, and the literal
(explicit attention matrix) dense-CLIP forward the fast SDPA path is checked against.

These invert the loaders' key conversions (``load_clip.py``, ``load_vfm.py``) so that round trips can be tested
on the tiny random models; coninfer itself never writes these formats (``coninfer models convert`` writes
transformers folders with ``save_clip_transformers`` / ``save_vfm_transformers``).
"""

from __future__ import annotations

import re

import torch

from coninfer.encoders.checkpoints import StateDict
from coninfer.encoders.clip import (
    FUSION_SCALE,
    MID_BLOCKS,
    DenseCLIP,
    _merge_heads,
    _mlp,
    _queries_keys_values,
)
from coninfer.encoders.convert_dinov3 import (
    _BLOCK,
    _META_BLOCK_RENAMES,
    _TIMM_BLOCK_TO_HF,
    _TIMM_MLP_TO_HF,
    _TIMM_SWIGLU_TO_HF,
    _TIMM_TOP_TO_HF,
)
from coninfer.encoders.dinov3 import DenseVFM
from coninfer.encoders.load_clip import _key_map
from coninfer.encoders.load_vfm import _layer_prefix
from coninfer.errors import CheckpointFormatError, InputError
from coninfer.settings import DenseCLIPSettings

# the variants the oracle knows: golden README section C
REFERENCE_VARIANTS = ("vanilla", "maskclip", "sclip", "clearclip", "segearth")


# --------------------------------------------------------------------------------------------- CLIP

def to_open_clip_state_dict(dense: DenseCLIP) -> StateDict:
    """The model's weights under OpenAI / open_clip names (the inverse of :func:`convert_open_clip_state_dict`)."""
    own = {name: tensor.detach().cpu().clone() for name, tensor in dense.model.state_dict().items()}
    inverse = {hf: oc for oc, hf in _key_map(dense.num_layers, _text_layers(dense)).items()}
    result: StateDict = {}
    for name, tensor in own.items():
        if name.endswith("position_ids"):
            continue
        block = re.match(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if block:
            tower, index, _, kind = block.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}.attn.in_proj_{kind}"
            if prefix not in result:
                parts = [own[f"{tower}.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                result[prefix] = torch.cat(parts, dim=0)
        elif name in ("visual_projection.weight", "text_projection.weight"):
            result["visual.proj" if name.startswith("visual") else "text_projection"] = tensor.T.contiguous()
        elif name in inverse:
            result[inverse[name]] = tensor
        else:
            raise CheckpointFormatError(f"no open_clip name for {name!r}", hint="this model is not a plain CLIP ViT")
    return result


def _text_layers(dense: DenseCLIP) -> int:
    return len(dense.model.text_model.encoder.layers) if hasattr(dense.model, "text_model") else 0


@torch.no_grad()
def reference_dense_tokens(dense: DenseCLIP, pixel_values: torch.Tensor, settings: DenseCLIPSettings,
                            output_cls_token: bool = False):
    """Test oracle: the same forward with explicit (B, n, L, L) attention matrices, literally as golden C says."""
    hidden, _ = dense._embed(pixel_values)
    layers = dense.model.vision_model.encoder.layers

    def probabilities(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.softmax(left @ right.transpose(-1, -2) * scale, dim=-1)

    mid_maps = []
    for index, layer in enumerate(layers[:-1]):
        queries, keys, values = _queries_keys_values(layer, layer.layer_norm1(hidden))
        attention = probabilities(queries, keys, layer.self_attn.scale)
        if index in MID_BLOCKS:
            mid_maps.append(attention)
        hidden = hidden + layer.self_attn.out_proj(_merge_heads(attention @ values))
        hidden = hidden + _mlp(layer, hidden)
    last = layers[-1]
    queries, keys, values = _queries_keys_values(last, last.layer_norm1(hidden))
    scale = last.self_attn.scale
    identity = torch.eye(queries.shape[2], dtype=queries.dtype, device=queries.device)  # (L, L)
    maps = {
        "vanilla": lambda: probabilities(queries, keys, scale),
        "maskclip": lambda: identity.expand(*queries.shape[:2], -1, -1),  # (L, L) -> (B, n, L, L)
        "sclip": lambda: probabilities(queries, queries, scale) + probabilities(keys, keys, scale),
        "clearclip": lambda: probabilities(queries, queries, scale),
        "segearth": lambda: (probabilities(queries, queries, scale) + probabilities(keys, keys, scale)
                             + probabilities(values, values, scale)),
    }
    attention = maps[settings.variant]()
    if settings.attn_lambda != 0.0:
        lam = settings.attn_lambda
        attention = FUSION_SCALE * ((1.0 - lam) * attention + lam * sum(mid_maps))
    output = last.self_attn.out_proj(_merge_heads(attention @ values))
    if not settings.ignore_residual:
        output = hidden + output
        output = output + _mlp(last, output)
    return dense._project(output, output_cls_token)


# --------------------------------------------------------------------------------------------- DINOv3


def transformers_to_timm(vfm: DenseVFM, *, qkv_bias: bool | None = None) -> StateDict:
    """Export a DINOv3 :class:`DenseVFM` as a timm state dict (``qkv_bias`` True -> the ``_qkvb`` key set).

    ``qkv_bias=None`` writes q/v biases only when they are non-zero. A non-zero k bias has no timm key: refused.
    """
    if not vfm.is_dinov3:
        raise InputError(f"{vfm.name} is not a DINOv3 model; only DINOv3 has a timm format here")
    state = _hf_state_on_disk(vfm)
    depth = int(vfm.model.config.num_hidden_layers)
    biases = [state.get(f"layer.{i}.attention.{p}_proj.bias") for i in range(depth) for p in "qv"]
    nonzero = any(b is not None and bool(b.abs().max() > 0) for b in biases)
    if qkv_bias is None:
        qkv_bias = nonzero
    if nonzero and not qkv_bias:
        raise InputError("the model has non-zero q/v biases, a plain timm checkpoint would drop them",
                         hint="export with qkv_bias=True (timm's *_qkvb models)")
    top = {v: k for k, v in _TIMM_TOP_TO_HF.items() if k != "mask_token"}
    block = {v: k for k, v in _TIMM_BLOCK_TO_HF.items()}
    mlp = {v: k for k, v in (_TIMM_SWIGLU_TO_HF if vfm.model.config.use_gated_mlp else _TIMM_MLP_TO_HF).items()}
    out: StateDict = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        match = re.match(r"^layer\.(\d+)\.(.+)$", key)
        if match is None:
            continue  # mask_token: pretraining only, timm has none
        index, rest = match.groups()
        prefix = f"blocks.{index}."
        if rest in ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"):
            if rest.startswith("attention.q"):  # fused once per block: rows [q | k | v]
                parts = [state[f"layer.{index}.attention.{p}_proj.weight"] for p in "qkv"]
                out[prefix + "attn.qkv.weight"] = torch.cat(parts, dim=0)
        elif rest == "attention.k_proj.bias":
            if bool(tensor.abs().max() > 0):
                raise InputError("the model has a non-zero k bias, which timm's DINOv3 cannot hold")
        elif rest in block:
            if block[rest] in ("attn.q_bias", "attn.v_bias") and not qkv_bias:
                continue
            out[prefix + block[rest]] = tensor
        elif rest.startswith("mlp."):
            layer, _, param = rest[len("mlp."):].partition(".")
            out[f"{prefix}mlp.{mlp[layer]}.{param}"] = tensor
        else:
            raise InputError(f"cannot export transformers key {key!r} to timm")
    if int(vfm.model.config.num_register_tokens) == 0:
        out.pop("reg_token", None)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def _hf_state_on_disk(vfm: DenseVFM) -> StateDict:
    """The model's state dict with the on-disk ``layer.N.`` prefix, whatever the transformers version."""
    prefix = _layer_prefix(vfm.model)
    return {("layer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in vfm.model.state_dict().items()}


def export_meta_state_dict(vfm: DenseVFM) -> StateDict:
    """Export a DINOv3 :class:`DenseVFM` in Meta's key format (the inverse of :func:`meta_to_timm` + mapping)."""
    timm_state = transformers_to_timm(vfm, qkv_bias=True)
    hidden = vfm.feature_dim
    state = _hf_state_on_disk(vfm)
    renames = {v: k for k, v in _META_BLOCK_RENAMES.items()}
    out: StateDict = {}
    for key, tensor in timm_state.items():
        match = _BLOCK.match(key)
        if key == "reg_token":
            out["storage_tokens"] = tensor
        elif match is None:
            out[key] = tensor
        else:
            index, rest = match.groups()
            prefix = f"blocks.{index}."
            if rest in ("attn.q_bias", "attn.v_bias"):
                continue
            out[prefix + renames.get(rest, rest)] = tensor
            if rest == "attn.qkv.weight":
                k_bias = state.get(f"layer.{index}.attention.k_proj.bias", torch.zeros(hidden)).float().cpu()
                q_bias, v_bias = timm_state[prefix + "attn.q_bias"], timm_state[prefix + "attn.v_bias"]
                out[prefix + "attn.qkv.bias"] = torch.cat([q_bias, k_bias, v_bias])
                # Meta multiplies the bias by this mask; its k third is 0 unless the model has a real k bias.
                k_mask = torch.ones(hidden) if bool(k_bias.abs().max() > 0) else torch.zeros(hidden)
                out[prefix + "attn.qkv.bias_mask"] = torch.cat([torch.ones(hidden), k_mask, torch.ones(hidden)])
    out.setdefault("storage_tokens", torch.zeros(1, 0, hidden))
    out["mask_token"] = state["embeddings.mask_token"].detach().float().cpu().reshape(1, hidden)
    out["rope_embed.periods"] = vfm.rope_periods
    return {k: v.contiguous() for k, v in out.items()}
