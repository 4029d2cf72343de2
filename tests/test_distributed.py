"""coninfer.distributed on real Gloo process groups of 1, 2 and 3 CPU processes (torch.multiprocessing spawn,
TCP rendezvous on localhost), compared with one process: the solver over shares, the confusion all-reduce,
distributed evaluation (JSON, state, resume with another world size), the work-folder check, and the launch
errors (in-process: they come before any rendezvous).

Each world size is launched once per module (one worker runs every check and writes what it saw), so the
whole file costs three launches. Every join and every collective has a timeout: a broken test fails, never hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from PIL import Image

from coninfer import distributed
from coninfer.cli import main
from coninfer.errors import InputError, ResourceError
from coninfer.evaluate.runner import evaluate_dataset
from coninfer.settings import SolverSettings
from coninfer.solver import assign, fit_context, refine
from coninfer.solver_core import initial_pass

WORLD_SIZES = (1, 2, 3)
N, K, D = 3000, 5, 16
CHUNK = 500  # the aligned case's global chunk grid (and block_rows)
N_IMAGES, CONTEXT = 7, 2
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
JOIN_TIMEOUT_S = 180.0
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered unit features (N, D) and noisy cosine logits (N, K), the same in every process."""
    generator = torch.Generator().manual_seed(7)
    centres = torch.nn.functional.normalize(torch.randn(K, D, generator=generator), dim=1)
    labels = torch.randint(0, K, (N,), generator=generator)
    features = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(N, D, generator=generator), dim=1)
    logits = features @ centres.T + 0.15 * torch.randn(N, K, generator=generator)
    return logits, features


def bounds(world: int, rank: int, idle: bool) -> tuple[int, int]:
    """Rows of ``rank``: contiguous shares of N; with ``idle``, rank 1 gets none (its share goes to rank 0)."""
    cuts = [N * r // world for r in range(world + 1)]
    if idle and world > 1:
        cuts[1] = cuts[2]
    return cuts[rank], cuts[rank + 1]


def chunked(logits: torch.Tensor, features: torch.Tensor, size: int):
    def chunks():
        for start in range(0, logits.shape[0], size):
            yield logits[start : start + size], features[start : start + size]

    return chunks


def write_loveda(root: Path) -> Path:
    """A converted LoveDA whose images carry their number in channel 2 (as tests/evaluate/test_runner.py)."""
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        stored = rng.integers(0, 7, (5, 6)).astype(np.uint8)
        image = np.stack([stored, rng.integers(0, 256, (5, 6)), np.full((5, 6), i)], axis=-1).astype(np.uint8)
        for folder, array in (("img_dir/val", image), ("ann_dir/val", stored)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"{3000 + i}.png")
    return root


def noisy(images):
    return [image[..., 1].astype(int) % 7 for image in images]


# -- the worker: one process of a launched group -------------------------------------------------------------


def worker(rank: int, world: int, port: int, folder: str, data_root: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several processes on a shared CPU
    out = Path(folder)
    dist = distributed.setup("cpu", timeout=COLLECTIVE_TIMEOUT)
    try:
        seen: dict = {"rank": dist.rank, "world": dist.world_size, "backend": dist.backend,
                      "device": str(dist.device)}
        _solver_cases(dist, out)
        matrix = np.arange(16, dtype=np.int64).reshape(4, 4) * (rank + 1) + 10**12 * rank
        seen["confusion"] = distributed.all_reduce_confusion(dist, matrix).tolist()
        seen.update(_eval_cases(dist, out, Path(data_root)))
        seen["band"] = list(distributed.band_of(dist, 10))
        seen["split"] = distributed.split(dist, list(range(7)))
        distributed.check_shared_folder(dist, out / "shared")
        try:
            distributed.check_shared_folder(dist, out / f"private-{rank}")  # a node-local folder per rank
            seen["private"] = None
        except InputError as error:
            seen["private"] = str(error)
        (out / f"seen-{rank}.json").write_text(json.dumps(seen))
    finally:
        distributed.teardown()


def _solver_cases(dist: distributed.Dist, out: Path) -> None:
    logits, features = problem()
    for case, idle in (("shares", False), ("idle", True)):
        start, stop = bounds(dist.world_size, dist.rank, idle)
        share = chunked(logits[start:stop], features[start:stop], 700)
        fit = distributed.fit_share(dist, share, SolverSettings(), joint=True, num_patches=stop - start,
                                    num_queries=K, num_features=D)
        z = assign(logits[start:stop], features[start:stop], fit.state, SolverSettings())
        np.save(out / f"z-{case}-{dist.rank}.npy", z.numpy())
        np.save(out / f"means-{case}-{dist.rank}.npy", fit.state.means.numpy())
    start, stop = bounds(dist.world_size, dist.rank, False)
    local, _ = initial_pass(chunked(logits[start:stop], features[start:stop], 700), SolverSettings())
    merged = distributed.gather_hook(dist, start, SolverSettings().init_topk)(local)
    np.save(out / f"candidates-{dist.rank}.npy", merged.index.numpy())
    settings = SolverSettings(block_rows=CHUNK)
    chunk_starts = distributed.split(dist, list(range(0, N, CHUNK)))  # whole chunks of the global grid
    start, stop = chunk_starts[0], chunk_starts[-1] + CHUNK
    fit = distributed.fit_share(dist, chunked(logits[start:stop], features[start:stop], CHUNK), settings,
                                joint=False, num_patches=stop - start, num_queries=K, num_features=D)
    z = torch.cat([assign(logits[s : s + CHUNK], features[s : s + CHUNK], fit.state, settings) for s in chunk_starts])
    np.save(out / f"z-aligned-{dist.rank}.npy", z.numpy())


def _eval_cases(dist: distributed.Dist, out: Path, data_root: Path) -> dict:
    predicted: list[list[int]] = []

    def recording(images):
        predicted.append([int(image[0, 0, 2]) for image in images])
        return noisy(images)

    result = evaluate_dataset("LoveDA", data_root, recording, context_size=CONTEXT, progress=False,
                              state_path=out / "state.json")
    full_run = predicted[:]
    predicted.clear()
    resumed = evaluate_dataset("LoveDA", data_root, recording, context_size=CONTEXT, progress=False,
                               state_path=out / "partial.json")  # written by one process, before the launch
    return {"eval": json.dumps(result.to_dict()), "predicted": full_run,
            "resumed": json.dumps(resumed.to_dict()), "resumed_predicted": predicted}


# -- launching ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(target, args: tuple, world: int, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Run ``target(rank, *args)`` in ``world`` spawned processes; fail (never hang) past ``timeout_s``."""
    context = mp.start_processes(target, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        # join() returns False while some worker runs, and raises ProcessRaisedException when one failed
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"world size {world}: the workers did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def launch(world: int, folder: Path, data_root: Path) -> list[dict]:
    spawn(worker, (world, free_port(), str(folder), str(data_root)), world)
    return [json.loads((folder / f"seen-{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def loveda(tmp_path_factory) -> Path:
    return write_loveda(tmp_path_factory.mktemp("loveda"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, loveda) -> dict:
    """One process, no group: the reference results, and a partial state (2 of 7 images) to resume from."""
    folder = tmp_path_factory.mktemp("single")
    calls = []

    def failing(images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return noisy(images)

    with pytest.raises(RuntimeError):
        evaluate_dataset("LoveDA", loveda, failing, context_size=CONTEXT, progress=False,
                         state_path=folder / "partial.json")
    result = evaluate_dataset("LoveDA", loveda, noisy, context_size=CONTEXT, progress=False,
                              state_path=folder / "state.json")
    return {"folder": folder, "eval": json.dumps(result.to_dict()),
            "state": (folder / "state.json").read_text(), "partial": (folder / "partial.json").read_text()}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda world: f"world{world}")
def launched(request, tmp_path_factory, loveda, single) -> tuple[int, Path, list[dict]]:
    world = request.param
    folder = tmp_path_factory.mktemp(f"world{world}")
    (folder / "partial.json").write_text(single["partial"])
    return world, folder, launch(world, folder, loveda)


def gathered(folder: Path, name: str, world: int) -> np.ndarray:
    return np.concatenate([np.load(folder / f"{name}-{rank}.npy") for rank in range(world)])


# -- what the ranks saw --------------------------------------------------------------------------------------


def test_ranks_join_one_gloo_group(launched):
    world, _, seen = launched
    assert [s["rank"] for s in seen] == list(range(world))
    assert {(s["world"], s["backend"], s["device"]) for s in seen} == {(world, "gloo", "cpu")}


@pytest.mark.parametrize("case", ["shares", "idle"])
def test_solver_over_shares_matches_one_process(launched, case):
    world, folder, _ = launched
    logits, features = problem()
    expected = refine(logits, features).numpy()
    z = gathered(folder, f"z-{case}", world)
    assert z.shape == expected.shape
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(z.argmax(1), expected.argmax(1))
    means = [np.load(folder / f"means-{case}-{rank}.npy") for rank in range(world)]
    assert all(np.array_equal(m, means[0]) for m in means)  # one mixture on every rank, to the bit


def test_gathered_candidates_are_the_single_process_top_k(launched):
    world, folder, _ = launched
    logits, features = problem()
    expected = initial_pass(chunked(logits, features, N), SolverSettings())[0].index.numpy()
    # prior_scale 100 saturates the log prior at 0.0 for many patches: the top-k is decided by the tie rule
    # (lowest global index), so a rank reporting local indices would bring other patches
    saturated = torch.log_softmax(100 * logits, dim=1) == 0
    assert (saturated.sum(dim=0) > SolverSettings().init_topk).all()
    for rank in range(world):
        np.testing.assert_array_equal(np.load(folder / f"candidates-{rank}.npy"), expected)


def test_shares_of_whole_chunks_are_bit_identical(launched):
    world, folder, _ = launched
    logits, features = problem()
    settings = SolverSettings(block_rows=CHUNK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers: CPU sums are blocked by thread, so bits depend on the count
    try:
        fit = fit_context(chunked(logits, features, CHUNK), settings, joint=False)
        expected = assign(logits, features, fit.state, settings).numpy()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(gathered(folder, "z-aligned", world), expected)


def test_confusion_all_reduce_is_exact(launched):
    world, _, seen = launched
    base = np.arange(16, dtype=np.int64).reshape(4, 4)
    expected = sum(base * (r + 1) + 10**12 * r for r in range(world))
    for s in seen:
        assert s["confusion"] == expected.tolist()


def test_eval_json_and_state_equal_one_process(launched, single):
    world, folder, seen = launched
    assert {s["eval"] for s in seen} == {single["eval"]}  # every rank returns the same result
    assert (folder / "state.json").read_text() == single["state"]
    batches = sorted(batch for s in seen for batch in s["predicted"])
    assert batches == [[0, 1], [2, 3], [4, 5], [6]]  # each batch predicted once, contents as in one process
    for s in seen:  # batch b on rank b % world
        assert all(batch[0] // CONTEXT % world == s["rank"] for batch in s["predicted"])


def test_eval_resumes_a_one_process_state_with_any_world_size(launched, single):
    _, _, seen = launched
    assert {s["resumed"] for s in seen} == {single["eval"]}
    assert sorted(batch for s in seen for batch in s["resumed_predicted"]) == [[2, 3], [4, 5], [6]]


def test_bands_and_splits_cover_in_rank_order(launched):
    _, _, seen = launched
    assert [row for s in seen for row in s["band"]] == list(range(10))
    assert [item for s in seen for item in s["split"]] == list(range(7))


def test_work_folder_not_shared_is_refused_on_every_rank(launched):
    world, _, seen = launched
    if world == 1:
        assert seen[0]["private"] is None  # one process: nothing to share
        return
    for s in seen:
        assert s["private"].startswith("--workdir ") and "not shared by all ranks" in s["private"]
        assert f"rank(s) {', '.join(str(r) for r in range(1, world))} " in s["private"]
        assert "\n" not in s["private"]


# -- launch errors and world size 1 (in this process: no group is ever joined) ---------------------------------


@pytest.fixture
def launch_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    distributed.teardown()


def test_no_launcher_is_world_size_one(launch_env):
    dist = distributed.setup("cpu")
    assert dist == distributed.Dist(device=torch.device("cpu")) and dist.is_main and not dist.grouped
    tensor = torch.arange(3.0)
    assert distributed.reduce_hook(dist)(tensor) is tensor
    np.testing.assert_array_equal(distributed.all_reduce_confusion(dist, np.eye(2, dtype=np.int64)), np.eye(2))
    assert list(distributed.band_of(dist, 4)) == [0, 1, 2, 3]


def test_world_size_without_rendezvous_is_one_line(launch_env):
    launch_env.setenv("WORLD_SIZE", "2")
    launch_env.setenv("RANK", "0")
    with pytest.raises(InputError, match=r"^WORLD_SIZE=2 is set but MASTER_ADDR, MASTER_PORT are not") as info:
        distributed.setup("cpu")
    assert "torchrun" in info.value.hint and "\n" not in str(info.value)


def test_eval_command_reports_a_bad_launch(launch_env, tmp_path):
    launch_env.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["eval", "LoveDA", "--data-root", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT")


def test_rank_without_gpu_is_refused(launch_env):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        launch_env.setenv(name, value)
    launch_env.setattr(torch.cuda, "is_available", lambda: True)
    launch_env.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ResourceError, match=r"LOCAL_RANK=1 has no GPU: this node has 1 \(--device cuda\)") as info:
        distributed.setup("cuda")
    assert "--nproc-per-node" in info.value.hint


def _one_and_torchrun_two(one_args: list[str], two_args: list[str]):
    """``coninfer one_args`` in this process with one thread (as torchrun's workers, OMP_NUM_THREADS=1: the same
    float rounding), then ``torchrun --nproc-per-node=2 -m coninfer two_args``; both must succeed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(main, one_args)
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in LAUNCH_ENV:
        env.pop(name, None)
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "coninfer", *two_args],
                         env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-2000:]
    return one, two


@pytest.mark.slow
def test_eval_command_under_torchrun_writes_the_single_process_json(tmp_path, monkeypatch):
    """`torchrun -m coninfer eval` with 2 processes and the tiny models: the same results JSON as 1 process."""
    write_loveda(tmp_path / "data")
    monkeypatch.setenv("CONINFER_CACHE", str(tmp_path / "cache"))
    args = ["eval", "LoveDA", "--data-root", str(tmp_path / "data"), "--vlm", "tiny-random", "--vfm", "tiny-random",
            "--device", "cpu", "--precision", "fp32", "--context-size", "2", "-q"]
    one, two = _one_and_torchrun_two([*args, "--output", str(tmp_path / "one.json"), "--state-dir",
                                      str(tmp_path / "state1")],
                                     [*args, "--output", str(tmp_path / "two.json"), "--state-dir",
                                      str(tmp_path / "state2")])
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    assert two.stdout == one.output  # the table, printed once (by rank 0)


@pytest.mark.slow
def test_segment_command_under_torchrun_writes_the_single_process_bytes(tmp_path, monkeypatch):
    """`torchrun -m coninfer segment` with 2 processes (tiles, solver chunks and stitch bands shared out) writes
    the class map, probabilities and report counts of 1 process; rank 0 alone prints the summary."""
    from tests import scenes

    scenes.rgb(tmp_path / "scene.tif", scenes.random_rgb(100, 120, seed=7))
    monkeypatch.setenv("CONINFER_CACHE", str(tmp_path / "cache"))

    def args(tag: str) -> list[str]:
        return ["segment", str(tmp_path / "scene.tif"), "-o", str(tmp_path / f"{tag}.tif"), "--classes",
                scenes.CLASSES, "--vlm", "tiny-random", "--vfm", "tiny-random", "--device", "cpu", "--precision",
                "fp32", "--tile-size", "32", "--overlap", "4", "--model-res", "32", "--batch-size", "2",
                "--probabilities", str(tmp_path / f"{tag}_p.tif"), "--workdir", str(tmp_path / f"work-{tag}")]

    _, two = _one_and_torchrun_two([*args("one"), "--quiet"], args("two"))
    for suffix in (".tif", "_p.tif"):
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes(), suffix
    reports = [json.loads((tmp_path / f"{tag}.json").read_text()) for tag in ("one", "two")]
    assert reports[0]["classes"] == reports[1]["classes"]
    assert two.stdout.count("wrote ") == 1  # the summary, once
