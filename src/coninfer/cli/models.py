"""`coninfer models`: list presets, download them into the Hugging Face cache, convert checkpoints."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import click

from coninfer._fs import temporary_name
from coninfer.encoders.normalization import NAMED
from coninfer.errors import OutputError

EXAMPLES = """
\b
Examples:
  coninfer models list
  coninfer models download dinov3-l16-sat
  coninfer models download simfeatup-clip-b16      # SegEarth-OV's upsampler, for --upsampler simfeatup-clip-b16
  coninfer models convert RemoteCLIP-ViT-B-32.pt remoteclip-hf --role vlm --activation gelu
  coninfer models convert dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth dinov3-l16-hf --role vfm --normalization sat493m
"""


@click.group(epilog=EXAMPLES)
def models() -> None:
    """List, download and convert model presets."""


@models.command("list")
def list_presets() -> None:
    """Print every preset with its role (vlm: --vlm, vfm: --vfm, upsampler: --upsampler), format, source and
    licence."""
    from coninfer.encoders.presets import PRESETS

    rows = [("name", "role", "format", "source", "licence", "description")]
    for preset in PRESETS.values():
        source = preset.source + (f" [{preset.filename}]" if preset.filename else "")
        name = preset.name + (" (default)" if preset.default else "") + (" (gated)" if preset.gated else "")
        rows.append((name, preset.role, preset.format, source, preset.licence, preset.description))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)) + "  " + row[5])


@models.command("download")
@click.argument("name")
def download(name: str) -> None:
    """Download preset NAME into the Hugging Face cache (needs internet once) and print where it is."""
    from coninfer.encoders.presets import download as download_preset

    click.echo(str(download_preset(name)))


@models.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--role", type=click.Choice(["vlm", "vfm"]), required=True,
              help="vlm: a CLIP checkpoint; vfm: a DINOv3/DINOv2 checkpoint.")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Attention heads of the vision tower (vlm) or of the VFM [default: inferred from the "
              "checkpoint; CLIP: width / 64].")
@click.option("--text-heads", type=click.IntRange(min=1), default=None,
              help="vlm only: attention heads of the text tower [default: width / 64].")
@click.option("--activation", type=click.Choice(["quick_gelu", "gelu"]), default=None,
              help="vlm only: MLP activation [default: quick_gelu for checkpoint files (OpenAI CLIP), the "
              "config's for folders; RemoteCLIP needs gelu].")
@click.option("--tokenizer", default=None,
              help="vlm only: tokenizer folder or hub id for a checkpoint file with a text tower "
              "[default: openai/clip-vit-base-patch16].")
@click.option("--normalization", type=click.Choice(sorted(NAMED)), default=None,
              help="Pixel statistics the weights were trained with, recorded in OUTPUT [default: those recorded "
              "with SOURCE (preset, config files); else ImageNet's for a VFM, OpenAI CLIP's for a VLM]. A bare "
              "Meta .pth records none: pass sat493m for SAT-493M weights.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is a model folder.")
def convert(source: str, output: Path, role: str, heads: int | None, text_heads: int | None,
            activation: str | None, tokenizer: str | None, normalization: str | None, overwrite: bool) -> None:
    """Convert SOURCE (preset, file or folder in any supported format) into a transformers folder OUTPUT.

    OUTPUT loads back with --vlm OUTPUT / --vfm OUTPUT and gives the same outputs as SOURCE, pixel statistics
    included.
    """
    from coninfer.encoders import presets

    _check_output_folder(output, overwrite)
    if role == "vlm":
        from coninfer.encoders.load_clip import save_clip_transformers

        model = presets.load_vlm(source, heads=heads, text_heads=text_heads, activation=activation,
                                 tokenizer=tokenizer, normalization=normalization)
        _write_folder(output, lambda folder: save_clip_transformers(model, folder))
    else:
        from coninfer.encoders.load_vfm import save_vfm_transformers

        clip_only = [name for name, value in (("--text-heads", text_heads), ("--activation", activation),
                                              ("--tokenizer", tokenizer)) if value is not None]
        if clip_only:
            raise click.UsageError(f"only for --role vlm: {', '.join(clip_only)}")
        model = presets.load_vfm(source, num_heads=heads, normalization=normalization)
        _write_folder(output, lambda folder: save_vfm_transformers(model, folder))
    click.echo(f"wrote {output} (use it as --{role} {output})")


def _check_output_folder(output: Path, overwrite: bool) -> None:
    """Refuse an existing OUTPUT without --overwrite, and with it anything that is not a model folder."""
    if not output.exists():
        return
    if not output.is_dir():
        raise OutputError(f"{output} is a file; the conversion writes a folder", hint="choose a folder path")
    if not overwrite:
        raise OutputError(f"{output} already exists", hint="pass --overwrite or choose another folder")
    if any(output.iterdir()) and not (output / "config.json").is_file():
        # --overwrite deletes the folder: only ever one that a conversion (or save_pretrained) wrote
        raise OutputError(f"{output} is not empty and holds no config.json, so it is not a model folder",
                          hint="choose another folder; --overwrite only replaces model folders")


def _write_folder(output: Path, save: Callable[[Path], object]) -> None:
    """Run ``save(folder)`` on a fresh sibling folder, then put it in place of ``output``: an old folder leaves
    no stale files behind, and a failed write leaves ``output`` untouched."""
    temporary = temporary_name(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        save(temporary)
        if output.exists():
            shutil.rmtree(output)
        temporary.rename(output)
    except OSError as error:
        raise OutputError(f"cannot write {output}: {error}", hint="check the folder's permissions and free space") \
            from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
