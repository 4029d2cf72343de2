"""GEM (Grounding Everything) dense CLIP: the ``gem`` variant of :class:`~coninfer.encoders.clip.DenseCLIP`.

GEM keeps the CLIP ViT unchanged and runs a second, attention-only path alongside its last ``gem_depth - 1``
blocks (golden README section G):

* positions: the pretraining (g x g) table is resized to the (h, w) grid by *antialiased* bicubic
  interpolation (cubic a = -0.5, support widened when shrinking, borders truncated and renormalised), not by
  the "+0.1" plain bicubic of the other variants;
* blocks 0 .. L - gem_depth run unchanged;
* each modified block updates the **original path** x like a normal block and, from ``hh = LN1(x)`` of that
  path, the **GEM path** g: for each u in (v, k, q), ``ss_attn_iter`` self-self iterations
  ``a <- softmax(β â âᵀ) â`` (â = a / ||a|| per token and head), then ``o_u = softmax(β â âᵀ) v``;
  ``g <- g + out_proj((o_v + o_k + o_q) / 3)`` (``g = out_proj(...)`` with ``ignore_residual``). The inverse
  temperature β is ``gem_temperature`` or, when that is None, ``head_dim^-0.5 * mean_n ||hh_n||`` per image;
* output: ``visual_projection(post_layernorm(g))``, patches without the class row.

Every softmax-weighted product goes through ``scaled_dot_product_attention`` (with β folded into ``scale=``
or into the query), so no L x L matrix is held here. ``attn_lambda`` is ignored by this variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

from coninfer.encoders.clip import DenseCLIP, _merge_heads, _mlp, _queries_keys_values
from coninfer.errors import InputError, ModelLoadError
from coninfer.settings import DenseCLIPSettings

CUBIC_A = -0.5  # the antialiased resampler's cubic coefficient (the plain bicubic one uses -0.75)
NORM_EPS = 1e-12  # of the per-head L2 normalisation inside the self-self iterations


@dataclass(frozen=True)
class GEMOutput:
    """Projected tokens of both paths, class row first: ``gem`` (B, 1 + h*w, E) and ``original`` (B, 1 + h*w, E)
    (= plain CLIP with GEM's positional resampling)."""

    gem: torch.Tensor
    original: torch.Tensor


def antialiased_bicubic_weights(size_in: int, size_out: int) -> torch.Tensor:
    """Resampling matrix (size_out, size_in), float64, of antialiased bicubic along one axis.

    Output index i has centre ``c = s (i + 0.5)`` with ``s = size_in / size_out``; taps j with
    ``max(int(c - S + 0.5), 0) <= j < min(int(c + S + 0.5), size_in)``, ``S = 2 max(s, 1)``, weigh
    ``K((j - c + 0.5) min(1, 1/s))`` renormalised to sum 1 (what ``F.interpolate(mode="bicubic",
    antialias=True, align_corners=False)`` computes for an output size).
    """
    scale = size_in / size_out
    support = 2.0 * max(scale, 1.0)
    stretch = min(1.0, 1.0 / scale)
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for index in range(size_out):
        centre = scale * (index + 0.5)
        first, stop = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        taps = torch.arange(first, stop, dtype=torch.float64)
        row = _cubic((taps - centre + 0.5) * stretch)
        weights[index, first:stop] = row / row.sum()
    return weights


def _cubic(t: torch.Tensor, a: float = CUBIC_A) -> torch.Tensor:
    """Keys' cubic convolution kernel K(t) with coefficient ``a`` (zero for |t| >= 2)."""
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = a * (((t - 5.0) * t + 8.0) * t - 4.0)
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def gem_position_embedding(position_embedding: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """GEM's positional table (1 + h*w, D) from a (1 + g*g, D) CLIP table; class position kept.

    Resampled whenever (h, w) != (g, g) (the resampler is the identity at (g, g) anyway). The official code
    decides by comparing the token count with the *width*; that quirk is not reproduced (where it would skip
    the resize, the official forward cannot add the positions at all).
    """
    num_positions, dim = position_embedding.shape
    grid = int(round((num_positions - 1) ** 0.5))
    if grid * grid != num_positions - 1:
        raise ModelLoadError(f"positional embedding has {num_positions - 1} patch positions, not a square grid",
                             hint="only square pretraining grids are supported")
    if (grid_h, grid_w) == (grid, grid):
        return position_embedding
    table = position_embedding[1:].reshape(grid, grid, dim).to(torch.float64)  # (g*g, D) -> (g, g, D)
    rows = antialiased_bicubic_weights(grid, grid_h).to(table.device)  # (h, g)
    cols = antialiased_bicubic_weights(grid, grid_w).to(table.device)  # (w, g)
    resized = torch.einsum("yg,gkd,xk->yxd", rows, table, cols)  # (g, g, D) -> (h, w, D), separable
    resized = resized.reshape(grid_h * grid_w, dim).to(position_embedding.dtype)  # (h, w, D) -> (h*w, D)
    return torch.cat([position_embedding[:1], resized], dim=0)


def gem_dense_tokens(dense: DenseCLIP, pixel_values: torch.Tensor, settings: DenseCLIPSettings,
                     output_cls_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GEM patch tokens (B, h*w, E), not normalised; with ``output_cls_token`` also the class row (B, E)."""
    projected = gem_forward(dense, pixel_values, settings).gem
    return (projected[:, 1:], projected[:, 0]) if output_cls_token else projected[:, 1:]


@torch.inference_mode()
def gem_forward(dense: DenseCLIP, pixel_values: torch.Tensor, settings: DenseCLIPSettings) -> GEMOutput:
    """Both paths of GEM on (B, 3, H, W) normalised pixels -> :class:`GEMOutput` (all L = 1 + h*w rows)."""
    layers = dense.model.vision_model.encoder.layers
    num_modified = settings.gem_depth - 1
    if num_modified > len(layers):
        raise InputError(f"clip.gem_depth: {settings.gem_depth} modifies {num_modified} blocks but the model has "
                         f"only {len(layers)}", hint=f"use gem_depth <= {len(layers) + 1} (GEM's default is 7)")
    hidden = _gem_embed(dense, pixel_values)
    first_modified = len(layers) - num_modified
    for layer in layers[:first_modified]:
        hidden, _ = _original_block(layer, hidden)
    gem_path = hidden
    for layer in layers[first_modified:]:
        normed = layer.layer_norm1(hidden)
        hidden, qkv = _original_block(layer, hidden, normed)
        output = _self_self_output(layer, normed, qkv, settings)
        gem_path = output if settings.ignore_residual else gem_path + output
    return GEMOutput(gem=_project_all(dense, gem_path), original=_project_all(dense, hidden))


def _gem_embed(dense: DenseCLIP, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patchify + class token + GEM positions + ``pre_layrnorm``: (B, 3, H, W) -> (B, 1 + h*w, D)."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise InputError(f"pixel_values: expected (B, 3, H, W), got {tuple(pixel_values.shape)}",
                         hint="pass a batch of normalised RGB images")
    batch, _, height, width = pixel_values.shape
    patch = dense.patch_size
    if height % patch or width % patch or height == 0 or width == 0:
        raise InputError(f"pixel_values: size {height}x{width} is not a multiple of the patch size {patch}",
                         hint=f"resize or pad the tiles to a multiple of {patch}")
    embeddings = dense.model.vision_model.embeddings
    pixel_values = pixel_values.to(device=dense.device, dtype=dense.dtype)
    patches = embeddings.patch_embedding(pixel_values)  # (B, D, h, w)
    patches = patches.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major
    class_token = embeddings.class_embedding.expand(batch, 1, -1)  # (D,) -> (B, 1, D)
    weight = embeddings.position_embedding.weight.detach()
    positions = gem_position_embedding(weight.float(), height // patch, width // patch).to(weight.dtype)
    return dense.model.vision_model.pre_layrnorm(torch.cat([class_token, patches], dim=1) + positions)


def _original_block(layer: nn.Module, hidden: torch.Tensor, normed: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A plain pre-LN block on (B, L, D); also returns its per-head (q, k, v), each (B, n, L, d)."""
    normed = layer.layer_norm1(hidden) if normed is None else normed
    queries, keys, values = _queries_keys_values(layer, normed)
    context = F.scaled_dot_product_attention(queries, keys, values, scale=layer.self_attn.scale)
    hidden = hidden + layer.self_attn.out_proj(_merge_heads(context))
    return hidden + _mlp(layer, hidden), (queries, keys, values)


def _self_self_output(layer: nn.Module, normed: torch.Tensor, qkv: tuple[torch.Tensor, ...],
                      settings: DenseCLIPSettings) -> torch.Tensor:
    """GEM's attention output (B, L, D): ``out_proj`` of the mean over u in (v, k, q) of the self-self maps.

    ``normed`` (B, L, D) is LN1 of the original path (it sets the automatic temperature); ``qkv`` its heads.
    """
    queries, keys, values = qkv
    if settings.gem_temperature is not None:
        query_gain, scale = None, settings.gem_temperature
    else:  # β = s * mean_n ||hh_n|| per image: the mean norm multiplies the query, s goes to ``scale=``
        query_gain = normed.norm(dim=-1).mean(dim=-1).view(-1, 1, 1, 1)  # (B, L, D) -> (B, 1, 1, 1)
        scale = layer.self_attn.scale

    def attend(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # softmax(β t tᵀ) targets
        query = tokens if query_gain is None else tokens * query_gain
        return F.scaled_dot_product_attention(query, tokens, targets, scale=scale)

    total = torch.zeros_like(values)
    for source in (values, keys, queries):
        tokens = source
        for _ in range(settings.gem_iterations):
            tokens = F.normalize(tokens, dim=-1, eps=NORM_EPS)
            tokens = attend(tokens, tokens)
        total = total + attend(F.normalize(tokens, dim=-1, eps=NORM_EPS), values)
    return layer.self_attn.out_proj(_merge_heads(total / 3.0))


def _project_all(dense: DenseCLIP, hidden: torch.Tensor) -> torch.Tensor:
    """``post_layernorm`` + projection of every row: (B, L, D) -> (B, L, E)."""
    return dense.model.visual_projection(dense.model.vision_model.post_layernorm(hidden))
