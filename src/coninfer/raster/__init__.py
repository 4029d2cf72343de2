"""Raster I/O for ``coninfer segment``: read scenes window by window, tile and stitch, write results.

Typical flow (the pipeline wires the models in between)::

    scene = open_scene("scene.tif")
    grid = TileGrid(scene.width, scene.height, tile_size=448, overlap=64)
    stitcher = BandStitcher(grid, num_classes)  # holds one band of tile rows, not the scene
    with scene.open() as src, ClassMapWriter("classes.tif", scene.georef, names) as classes:
        for index, window in enumerate(grid):  # row-major, as BandStitcher requires
            rgb, valid = read_window(scene, window, src=src)
            for block in stitcher.add(index, probs_of(rgb), valid):
                classes.write(block.window, block.labels)
"""

from __future__ import annotations

from coninfer.raster.read import (
    GDAL_CACHE_BYTES,
    STATS_SIZE,
    STRETCH_PERCENTILES,
    Georef,
    Scene,
    gdal_cache_env,
    open_scene,
    parse_bands,
    read_overview,
    read_window,
    scene_is_empty,
)
from coninfer.raster.tiles import (
    NODATA_LABEL,
    BandStitcher,
    StitchedBlock,
    TileGrid,
    blend_weights,
    block_windows,
)
from coninfer.raster.write import (
    ClassMapWriter,
    ProbabilityWriter,
    atomic_path,
    check_output_path,
    class_areas,
    class_statistics,
    count_classes,
    default_colors,
    write_class_map,
    write_preview,
    write_probabilities,
    write_report,
    write_vectors,
)

__all__ = [
    "GDAL_CACHE_BYTES",
    "NODATA_LABEL",
    "STATS_SIZE",
    "STRETCH_PERCENTILES",
    "BandStitcher",
    "ClassMapWriter",
    "Georef",
    "ProbabilityWriter",
    "Scene",
    "StitchedBlock",
    "TileGrid",
    "atomic_path",
    "blend_weights",
    "block_windows",
    "check_output_path",
    "class_areas",
    "class_statistics",
    "count_classes",
    "default_colors",
    "gdal_cache_env",
    "open_scene",
    "parse_bands",
    "read_overview",
    "read_window",
    "scene_is_empty",
    "write_class_map",
    "write_preview",
    "write_probabilities",
    "write_report",
    "write_vectors",
]
