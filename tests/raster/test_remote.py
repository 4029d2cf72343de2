"""Tests of reading scenes over HTTP through GDAL's /vsicurl/, against servers the tests start on 127.0.0.1.

The server runs in a child process, not a thread: rasterio holds the GIL while GDAL opens a URL, so a server
thread in the test process could never answer. Each server stops itself after SERVER_LIFETIME_S and is
terminated in teardown.
"""

from __future__ import annotations

import http.server
import io
import multiprocessing
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from coninfer.errors import InputFileError
from coninfer.raster import open_scene, read_window

SERVER_LIFETIME_S = 60
SIZE = 1024


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range requests (206 Partial Content); logs every request."""

    ranges = True

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        with open(self.server.log_path, "a") as log:
            log.write(f"{self.command} {self.headers.get('Range')} {getattr(self, '_sent', '-')}\n")

    def send_head(self):
        path, requested = self.translate_path(self.path), self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", requested or "")
        if not (self.ranges and match and Path(path).is_file()):
            if Path(path).is_file():
                self._sent = Path(path).stat().st_size
            return super().send_head()
        size = Path(path).stat().st_size
        start, end = int(match.group(1)), min(int(match.group(2) or size - 1), size - 1)
        with open(path, "rb") as file:
            file.seek(start)
            body = file.read(end - start + 1)
        self._sent = len(body)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)


class _NoRangeHandler(_RangeHandler):
    """Ignores Range headers: every GET answers 200 with the whole file."""

    ranges = False


def _serve(folder: str, log_path: str, ranges: bool, ready) -> None:
    handler = _RangeHandler if ranges else _NoRangeHandler

    def bound(*args, **kwargs):
        return handler(*args, directory=folder, **kwargs)

    server = http.server.HTTPServer(("127.0.0.1", 0), bound)
    server.log_path, server.timeout = log_path, 0.2
    ready.send(server.server_port)
    deadline = time.monotonic() + SERVER_LIFETIME_S
    while time.monotonic() < deadline:
        server.handle_request()
    server.server_close()


def _start(folder: Path, ranges: bool):
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    log = folder / f"requests-{ranges}.log"
    process = context.Process(target=_serve, args=(str(folder), str(log), ranges, send), daemon=True)
    process.start()
    if not receive.poll(10):
        process.terminate()
        pytest.fail("the test HTTP server did not start")
    return process, receive.recv(), log


@pytest.fixture
def served(tmp_path: Path):
    """A 1024² uint8 RGB COG (random, so incompressible) and the base URL of each kind of server."""
    data = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    profile = {"driver": "COG", "width": SIZE, "height": SIZE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:25832", "transform": rasterio.Affine(0.5, 0, 346000, 0, -0.5, 5648000),
               "blocksize": 256}
    with rasterio.open(tmp_path / "scene.tif", "w", **profile) as dst:
        dst.write(data)
    servers = {ranges: _start(tmp_path, ranges) for ranges in (True, False)}
    yield data, {ranges: (f"http://127.0.0.1:{port}", log) for ranges, (_, port, log) in servers.items()}
    for process, _, _ in servers.values():
        process.terminate()
        process.join(5)


class TestRangeServer:
    def test_window_reads_fetch_part_of_the_file(self, served, tmp_path: Path) -> None:
        data, urls = served
        base, log = urls[True]
        scene = open_scene(f"{base}/scene.tif")
        assert scene.path == f"{base}/scene.tif" and (scene.width, scene.crs.to_epsg()) == (SIZE, 25832)
        with scene.open() as src:
            rgb, valid = read_window(scene, Window(256, 512, 256, 256), src=src)
        np.testing.assert_array_equal(rgb, data[:, 512:768, 256:512])
        assert valid.all()
        requests = [line.split() for line in log.read_text().splitlines()]
        gets = [r for r in requests if r[0] == "GET"]
        assert all(r[1] != "None" for r in gets)  # every GET asks for a byte range
        fetched = sum(int(r[2]) for r in gets)
        assert fetched < (tmp_path / "scene.tif").stat().st_size / 3  # one window, not the file

    def test_no_sidecar_probes(self, served) -> None:
        _, urls = served
        base, log = urls[True]
        open_scene(f"{base}/scene.tif")
        assert len(log.read_text().splitlines()) <= 3  # GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR

    def test_missing_file(self, served) -> None:
        _, urls = served
        with pytest.raises(InputFileError, match="cannot open http://.*/nope.tif") as info:
            open_scene(f"{urls[True][0]}/nope.tif")
        assert "\n" not in str(info.value) and "URL" in info.value.hint


class TestOtherServers:
    def test_server_without_range_requests(self, served) -> None:
        _, urls = served
        with pytest.raises(InputFileError, match="does not support HTTP range requests") as info:
            open_scene(f"{urls[False][0]}/scene.tif")
        assert "download" in info.value.hint and "\n" not in str(info.value)

    def test_unreachable_url(self) -> None:
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(InputFileError, match=f"cannot open http://127.0.0.1:{port}/a.tif") as info:
            open_scene(f"http://127.0.0.1:{port}/a.tif")
        assert "\n" not in str(info.value) and "does not exist" not in str(info.value)
