"""`coninfer cache`: see and free the work folders that keep scene embeddings for resuming and re-querying."""

from __future__ import annotations

from pathlib import Path

import click

EXAMPLES = """
\b
Examples:
  coninfer cache list
  coninfer cache clear --older-than 7
  coninfer cache clear 6c567e8458386c5b6fcf
"""

_WORKDIR = click.option("--workdir", type=click.Path(path_type=Path),
                        help="The --workdir given to `segment` [default: $CONINFER_CACHE/work or ~/.cache/coninfer/work].")


@click.group(epilog=EXAMPLES)
def cache() -> None:
    """List and clear work folders (embeddings kept by --keep-embeddings, unfinished runs)."""


@cache.command("list")
@_WORKDIR
def list_command(workdir: Path | None) -> None:
    """Print each work folder: its input, tiles embedded, query stores, size on disk and last use."""
    from coninfer.work_cache import age, human_size, list_work_folders, work_root

    root = work_root(workdir)
    folders = list_work_folders(root)
    rows = [("folder", "input", "tiles", "queries", "size", "used")]
    for folder in folders:
        tiles = f"{folder.tiles_done}/{folder.tiles if folder.tiles is not None else '?'}"
        rows.append((folder.name, folder.input or "?", tiles, str(folder.query_stores), human_size(folder.size_bytes),
                     age(folder.modified)))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
    total = sum(folder.size_bytes for folder in folders)
    click.echo(f"{len(folders)} work folder(s), {human_size(total)} in {root}")


@cache.command("clear")
@click.argument("folders", nargs=-1)
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS", help="Only folders unused for DAYS days.")
@_WORKDIR
def clear_command(folders: tuple[str, ...], older_than: float | None, workdir: Path | None) -> None:
    """Delete FOLDERS (names from `coninfer cache list`; default: every work folder). Folders a running run
    holds are left alone."""
    from coninfer.work_cache import clear_work_folders, human_size, work_root

    root = work_root(workdir)
    deleted, busy = clear_work_folders(root, list(folders) or None, older_than_days=older_than)
    for folder in busy:
        click.echo(f"kept {folder.name}: a run is using it", err=True)
    freed = sum(folder.size_bytes for folder in deleted)
    click.echo(f"deleted {len(deleted)} work folder(s), {human_size(freed)} freed in {root}")
