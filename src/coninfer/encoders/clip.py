"""Dense CLIP: per-patch CLIP features from a transformers CLIP model with MaskCLIP-style attention surgery.

The vision forward is written out here, block by block, on the weights of transformers' ``CLIPVisionModel``
(``q_proj/k_proj/v_proj/out_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``), because the last block is replaced:

* blocks 0..L-2 run unchanged;
* the last block attends with a variant-specific map ``A`` on ``h = LN1(x)`` (per head, s = head_dim^-0.5):
  vanilla ``softmax(q kᵀ s)``; maskclip identity; sclip ``softmax(q qᵀ s) + softmax(k kᵀ s)``;
  clearclip ``softmax(q qᵀ s)``; segearth ``softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)``;
* with λ = ``attn_lambda`` != 0 the map becomes ``3 ((1 - λ) A + λ R)``, ``R = Σ_{l in 1,4,7,10} softmax(q_l k_lᵀ s)``
  with each block's own queries/keys (the official ConInfer fusion, golden README section C);
* ``ignore_residual`` drops the residual and the MLP of the last block.

Every product ``A v`` is evaluated as a sum of ``scaled_dot_product_attention`` calls (A is linear in its
softmax terms), so no L x L attention matrix is ever materialised here; MaskCLIP's identity map is just ``v``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

from coninfer.encoders.normalization import OPENAI_CLIP, Normalization
from coninfer.errors import InputError, ModelLoadError
from coninfer.prompts import embed_queries, load_templates
from coninfer.settings import DenseCLIPSettings

logger = logging.getLogger(__name__)

CLIP_MEAN = OPENAI_CLIP.mean
CLIP_STD = OPENAI_CLIP.std
MID_BLOCKS = (1, 4, 7, 10)  # 0-based blocks whose attention maps form R (blocks 2, 5, 8, 11 in the paper)
FUSION_SCALE = 3.0  # the official code rescales the fused map by 3, whatever the variant

# text-config fields that change text embeddings but are not stored in an OpenAI/open_clip state dict
_TEXT_SWITCHES = ("hidden_act", "num_attention_heads", "layer_norm_eps", "max_position_embeddings", "eos_token_id")
_TOKENIZER_PROBE = "a photo of a building, a road and 2 cars."
_FINGERPRINT_VALUES = 4096  # values sampled per text weight for the cache key

def check_tokenizer(tokenizer, source: str) -> None:
    """Raise :class:`ModelLoadError` if ``tokenizer`` cannot be a working CLIP BPE tokenizer.

    ``CLIPTokenizer.from_pretrained`` on a folder without vocabulary files silently returns a tokenizer with a
    2-3 token vocabulary that maps every word to the unknown token; text embeddings from it are meaningless.
    """
    problem = None
    try:
        ids = list(tokenizer("a photo of a building.")["input_ids"])
    except Exception as error:  # any failure to tokenise means the tokenizer is unusable
        ids, problem = [], f"it fails to tokenise text ({error})"
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    words = [i for i in ids if i not in special]
    if problem is None and (tokenizer.vocab_size is None or tokenizer.vocab_size < 256):
        problem = f"its vocabulary has only {tokenizer.vocab_size} tokens"
    elif problem is None and not words:
        problem = f"'a photo of a building.' became only special tokens {ids}"
    elif problem is None and tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in words):
        problem = "every word of 'a photo of a building.' became the unknown token"
    if problem:
        raise ModelLoadError(
            f"the CLIP tokenizer from {source} is broken: {problem}",
            hint="its vocab.json/merges.txt (or tokenizer.json) are missing; pass a folder that has them, "
            "or download the default one once with `coninfer models download`",
        )


class DenseCLIP(nn.Module):
    """Dense (per-patch) CLIP on a transformers ``CLIPModel`` (or a vision-only ``CLIPVisionModelWithProjection``).

    Inputs are ``pixel_values`` (B, 3, H, W), already normalised with ``normalization`` (mean/std on the 0-1 scale,
    set by the loader: OpenAI's CLIP statistics unless the weights record others), H and W multiples of
    ``patch_size``; outputs use a row-major (h, w) = (H/p, W/p) patch grid. ``fingerprint`` identifies the weights
    (see :mod:`coninfer.encoders.checkpoints`); ``unrecorded:<name>`` for a model built in memory.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, settings: DenseCLIPSettings | None = None,
                 name: str = "clip", normalization: Normalization = OPENAI_CLIP, fingerprint: str | None = None) -> None:
        super().__init__()
        if not hasattr(model, "vision_model") or not hasattr(model, "visual_projection"):
            raise ModelLoadError(f"{type(model).__name__} is not a CLIP model with a vision tower and projection",
                                 hint="pass a transformers CLIPModel or CLIPVisionModelWithProjection")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings if settings is not None else DenseCLIPSettings()
        self.name = name
        self.patch_size = _as_int(self.vision_config.patch_size)
        self.embed_dim = int(model.visual_projection.out_features)
        self.normalization = normalization
        self.fingerprint = fingerprint if fingerprint is not None else f"unrecorded:{name}"
        self._position_cache: dict[tuple, torch.Tensor] = {}
        if self.has_text:
            check_tokenizer(tokenizer, name)
            vocab_size = int(model.config.text_config.vocab_size)
            if len(tokenizer) > vocab_size:
                raise ModelLoadError(
                    f"{name}: the tokenizer has {len(tokenizer)} tokens but the text tower only {vocab_size}",
                    hint="pass the tokenizer that belongs to this checkpoint",
                )

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.normalization.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.normalization.std

    @property
    def vision_config(self):
        config = self.model.config
        return config.vision_config if hasattr(config, "vision_config") else config

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "text_model") and self.tokenizer is not None

    @property
    def num_layers(self) -> int:
        return len(self.model.vision_model.encoder.layers)

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @property
    def text_model_key(self) -> str:
        """Identifies the text encoder for the embedding cache: name, dtype and a fingerprint of all that shapes a
        text embedding. That includes the switches a checkpoint file cannot record (activation, head count: the
        same file loaded with another ``activation`` gives other embeddings), a sample of every text weight, and
        the tokenizer."""
        self._require_text()
        config = self.model.config.text_config
        switches = {field: getattr(config, field, None) for field in _TEXT_SWITCHES}
        probe = list(self.tokenizer(_TOKENIZER_PROBE)["input_ids"])
        digest = hashlib.sha256(json.dumps([switches, len(self.tokenizer), probe], default=str).encode())
        weights = [("text_projection.weight", self.model.text_projection.weight),
                   *self.model.text_model.named_parameters()]
        for name, weight in weights:
            flat = weight.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _FINGERPRINT_VALUES)]  # cheap, yet sees every tensor
            digest.update(f"{name}{tuple(weight.shape)}".encode())
            digest.update(sample.float().cpu().numpy().tobytes())
        return f"{self.name}|{str(self.dtype).removeprefix('torch.')}|{digest.hexdigest()[:16]}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.dense_features(pixel_values)

    @torch.inference_mode()
    def dense_tokens(self, pixel_values: torch.Tensor, settings: DenseCLIPSettings | None = None,
                     output_cls_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Projected patch tokens (B, h*w, E), not normalised; with ``output_cls_token`` also the class token (B, E)."""
        settings = settings if settings is not None else self.settings
        if settings.variant == "gem":
            from coninfer.encoders.gem import gem_dense_tokens  # imported here: gem builds on this module

            return gem_dense_tokens(self, pixel_values, settings, output_cls_token)
        hidden, _ = self._embed(pixel_values)
        layers = self.model.vision_model.encoder.layers
        fuse = settings.attn_lambda != 0.0
        self._check_fusion(settings)
        mid_queries_keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index, layer in enumerate(layers[:-1]):
            hidden, queries, keys = _encoder_block(layer, hidden)
            if fuse and index in MID_BLOCKS:
                mid_queries_keys.append((queries, keys))
        output = _surgery_block(layers[-1], hidden, settings, mid_queries_keys)
        return self._project(output, output_cls_token)

    def dense_features(self, pixel_values: torch.Tensor, settings: DenseCLIPSettings | None = None) -> torch.Tensor:
        """L2-normalised patch features (B, h*w, E), float32."""
        return F.normalize(self.dense_tokens(pixel_values, settings).float(), dim=-1)

    def dense_logits(self, pixel_values: torch.Tensor, query_embeddings: torch.Tensor,
                     settings: DenseCLIPSettings | None = None) -> torch.Tensor:
        """Cosine similarities (B, h*w, K) of every patch with every query embedding (K, E), float32."""
        if query_embeddings.ndim != 2 or query_embeddings.shape[1] != self.embed_dim:
            raise InputError(f"query_embeddings: expected (K, {self.embed_dim}), got {tuple(query_embeddings.shape)}",
                             hint="embed the queries with this model's encode_queries")
        features = self.dense_features(pixel_values, settings)
        queries = F.normalize(query_embeddings.to(device=features.device, dtype=torch.float32), dim=-1)
        return features @ queries.T  # (B, h*w, E) @ (E, K) -> (B, h*w, K)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (n, E) of ``texts``, float32, not normalised."""
        self._require_text()
        texts = list(texts)
        max_length = int(self.model.config.text_config.max_position_embeddings)
        _warn_if_truncated(texts, self.tokenizer(texts, verbose=False)["input_ids"], max_length)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=batch["input_ids"].to(self.device),
                                       attention_mask=batch["attention_mask"].to(self.device)).pooler_output
        return self.model.text_projection(pooled).float()

    def encode_queries(self, queries: Sequence[str], templates: Sequence[str] | None = None,
                       cache_dir: str | Path | None = None, use_cache: bool = True) -> torch.Tensor:
        """Prompt-ensemble query embeddings (K, E), float32, unit rows (see :func:`coninfer.prompts.embed_queries`)."""
        return embed_queries(queries, self.encode_text, templates=templates if templates is not None else load_templates(),
                             model_key=self.text_model_key, cache_dir=cache_dir, use_cache=use_cache)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embedding (1 + h*w, D) for an (h, w) patch grid, cached per grid size, in the model dtype."""
        weight = self.model.vision_model.embeddings.position_embedding.weight
        key = (grid_h, grid_w, weight.device, weight.dtype, weight.data_ptr(), weight._version)
        if key not in self._position_cache:
            if len(self._position_cache) > 16:
                self._position_cache.clear()
            table = interpolate_position_embedding(weight.detach().float(), grid_h, grid_w)
            self._position_cache[key] = table.to(weight.dtype)
        return self._position_cache[key]

    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify + class token + positions + ``pre_layrnorm``: (B, 3, H, W) -> (B, 1 + h*w, D)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InputError(f"pixel_values: expected (B, 3, H, W), got {tuple(pixel_values.shape)}",
                             hint="pass a batch of normalised RGB images")
        batch, _, height, width = pixel_values.shape
        if height % self.patch_size or width % self.patch_size or height == 0 or width == 0:
            raise InputError(f"pixel_values: size {height}x{width} is not a multiple of the patch size {self.patch_size}",
                             hint=f"resize or pad the tiles to a multiple of {self.patch_size}")
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        embeddings = self.model.vision_model.embeddings
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        patches = embeddings.patch_embedding(pixel_values)  # (B, D, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major
        class_token = embeddings.class_embedding.expand(batch, 1, -1)  # (D,) -> (B, 1, D)
        tokens = torch.cat([class_token, patches], dim=1) + self.position_embedding(grid_h, grid_w)
        return self.model.vision_model.pre_layrnorm(tokens), (grid_h, grid_w)

    def _project(self, output: torch.Tensor, output_cls_token: bool):
        """``post_layernorm`` + projection of (B, 1 + h*w, D) -> patches (B, h*w, E) [and class token (B, E)]."""
        projected = self.model.visual_projection(self.model.vision_model.post_layernorm(output))
        return (projected[:, 1:], projected[:, 0]) if output_cls_token else projected[:, 1:]

    def _check_fusion(self, settings: DenseCLIPSettings) -> None:
        if settings.attn_lambda != 0.0 and self.num_layers <= max(MID_BLOCKS) + 1:
            raise InputError(
                f"attn_lambda: {settings.attn_lambda} needs more than {max(MID_BLOCKS) + 1} ViT blocks, "
                f"this model has {self.num_layers}", hint="set attn_lambda=0 for this model",
            )

    def _require_text(self) -> None:
        if not self.has_text:
            raise ModelLoadError(f"{self.name} has no text encoder (visual-only checkpoint or no tokenizer)",
                                 hint="load a checkpoint with a text tower, or pass precomputed query embeddings")


def _warn_if_truncated(texts: list[str], token_ids: list[list[int]], max_length: int) -> None:
    """Log the texts longer than the text encoder's context: they are cut, so queries that differ only after the
    cut would get the same embedding (CLIP's own tokenizer refuses such texts; open_clip cuts them silently)."""
    cut = [(text, len(ids)) for text, ids in zip(texts, token_ids, strict=True) if len(ids) > max_length]
    if cut:
        text, length = cut[0]
        # a class name can be thousands of characters (or hold newlines): the warning must stay one short line
        keep = 60
        example = " ".join(text.split())
        example = example if len(example) <= keep else example[:keep] + "…"
        logger.warning("%d of %d texts exceed CLIP's %d-token context and are truncated, e.g. %r (%d tokens); "
                       "shorten long class names", len(cut), len(texts), max_length, example, length)


def interpolate_position_embedding(position_embedding: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a (1 + g*g, D) CLIP positional embedding to (1 + h*w, D), as the official code does.

    The class position is kept; the g x g patch table is resized with bicubic interpolation (a = -0.75,
    ``align_corners=False``) called with *scale factors* ``(h + 0.1)/g``, ``(w + 0.1)/g``: the output size is
    (h, w), but the sampling positions are ``src = (dst + 0.5) * g / (h + 0.1) - 0.5``. Unlike the official code
    (which only interpolates when the token count differs), any grid other than (g, g) is interpolated.
    """
    num_positions, dim = position_embedding.shape
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise ModelLoadError(f"positional embedding has {num_positions - 1} patch positions, not a square grid",
                             hint="only square pretraining grids are supported")
    if (grid_h, grid_w) == (grid, grid):
        return position_embedding
    table = position_embedding[1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # (g*g, D) -> (1, D, g, g)
    resized = F.interpolate(table, scale_factor=((grid_h + 0.1) / grid, (grid_w + 0.1) / grid), mode="bicubic",
                            align_corners=False, recompute_scale_factor=False)
    if tuple(resized.shape[-2:]) != (grid_h, grid_w):
        raise InputError(f"positional embedding resize gave {tuple(resized.shape[-2:])}, not {(grid_h, grid_w)}")
    resized = resized.permute(0, 2, 3, 1).reshape(grid_h * grid_w, dim)  # (1, D, h, w) -> (h*w, D)
    return torch.cat([position_embedding[:1], resized], dim=0)


def _split_heads(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = tensor.shape
    return tensor.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # (B, L, D) -> (B, n, L, d)


def _merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    batch, num_heads, length, head_dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, length, num_heads * head_dim)  # (B, n, L, d) -> (B, L, D)


def _queries_keys_values(layer: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-head q, k, v (B, n, L, d) of ``layer`` for the layer-normed input (B, L, D)."""
    attention = layer.self_attn
    return tuple(_split_heads(projection(normed), attention.num_heads)
                 for projection in (attention.q_proj, attention.k_proj, attention.v_proj))


def _mlp(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    mlp = layer.mlp
    return mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layer_norm2(hidden))))


def _encoder_block(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unchanged pre-LN block on (B, L, D); also returns its q and k (B, n, L, d) for the λ-fusion."""
    queries, keys, values = _queries_keys_values(layer, layer.layer_norm1(hidden))
    context = F.scaled_dot_product_attention(queries, keys, values, scale=layer.self_attn.scale)
    hidden = hidden + layer.self_attn.out_proj(_merge_heads(context))
    return hidden + _mlp(layer, hidden), queries, keys


def _surgery_block(layer: nn.Module, hidden: torch.Tensor, settings: DenseCLIPSettings,
                   mid_queries_keys: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The rewired last block on (B, L, D) -> (B, L, D); ``A v`` as a sum of SDPA calls."""
    queries, keys, values = _queries_keys_values(layer, layer.layer_norm1(hidden))
    scale = layer.self_attn.scale

    def attend(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:  # softmax(left rightᵀ s) v
        return F.scaled_dot_product_attention(left, right, values, scale=scale)

    variant = settings.variant
    if variant == "vanilla":
        context = attend(queries, keys)
    elif variant == "maskclip":
        context = values
    elif variant == "clearclip":
        context = attend(queries, queries)
    else:
        context = attend(queries, queries) + attend(keys, keys)
        if variant == "segearth":
            context = context + attend(values, values)
    if mid_queries_keys:
        lam = settings.attn_lambda
        mid = sum(attend(mid_q, mid_k) for mid_q, mid_k in mid_queries_keys)
        context = FUSION_SCALE * ((1.0 - lam) * context + lam * mid)
    output = layer.self_attn.out_proj(_merge_heads(context))
    if settings.ignore_residual:
        return output
    hidden = hidden + output
    return hidden + _mlp(layer, hidden)


def _as_int(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelLoadError(f"non-square patch size {value} is not supported")
        value = value[0]
    return int(value)
