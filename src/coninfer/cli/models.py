"""`coninfer models`: list presets, download them into the Hugging Face cache, convert checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from coninfer.errors import InputError, OutputError

EXAMPLES = """
\b
Examples:
  coninfer models list
  coninfer models download dinov3-l16-sat
  coninfer models convert RemoteCLIP-ViT-B-32.pt remoteclip-hf --role vlm
  coninfer models convert dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth dinov3-l16-hf --role vfm
"""


@click.group(epilog=EXAMPLES)
def models() -> None:
    """List, download and convert model presets."""


@models.command("list")
def list_presets() -> None:
    """Print every preset with its role, format, source and licence."""
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
    """Download preset NAME into the Hugging Face cache (needs internet once)."""
    from coninfer.encoders.presets import download as download_preset

    click.echo(str(download_preset(name)))


@models.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--role", type=click.Choice(["vlm", "vfm"]), required=True,
              help="vlm: a CLIP checkpoint; vfm: a DINOv3/DINOv2 checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def convert(source: str, output: Path, role: str, overwrite: bool) -> None:
    """Convert SOURCE (preset, file or folder in any supported format) into a transformers folder OUTPUT."""
    from coninfer.encoders import presets

    if output.exists() and not overwrite:
        raise OutputError(f"{output} already exists", hint="pass --overwrite or choose another folder")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output} is a file; the conversion writes a folder", hint="choose a folder path")
    if role == "vlm":
        from coninfer.encoders.convert_clip import save_clip_transformers

        save_clip_transformers(presets.load_vlm(source), output)
    else:
        from coninfer.encoders.convert_dinov3 import save_vfm_transformers

        save_vfm_transformers(presets.load_vfm(source), output)
    click.echo(f"wrote {output}")
