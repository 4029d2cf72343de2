"""DINOv3 state-dict key conversions: Meta's names to timm's, timm's to transformers'.

The rules are those of the golden TIMM_DINOV3.md (sections 4 and 5). There are no transposes: q/k/v are row splits
of the fused qkv. Meta checkpoints carry their RoPE periods (``rope_embed.periods``); they are kept so outputs match
Meta's code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from coninfer.encoders.checkpoints import StateDict
from coninfer.errors import CheckpointFormatError

# Heads cannot be read from tensor shapes (only the product heads * head_dim can): the released widths.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
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


def _strip_backbone_prefix(state_dict: StateDict) -> StateDict:
    """Meta's training checkpoints nest the ViT under ``backbone.``; the released ones do not."""
    if state_dict and all(key.startswith("backbone.") for key in state_dict):
        return {key[len("backbone."):]: value for key, value in state_dict.items()}
    return state_dict
