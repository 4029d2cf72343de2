"""`coninfer eval` end to end on tiny synthetic converted datasets with the tiny random models.

The scores are meaningless (random weights); the tests check the plumbing: files, tables, settings, resuming and
the handling of missing datasets. Text embeddings are cached in one folder for the module (CONINFER_CACHE) and
the tiny CLIP is built once and copied, so that each run only pays for its forward passes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import coninfer.encoders.presets as presets
import coninfer.encoders.tiny as tiny_module
import coninfer.tile_step as pipeline
from coninfer.cli import main
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.evaluate import dataset_names, load_dataset_spec
from coninfer.settings import DenseCLIPSettings

TINY = ["--vlm", "tiny-random", "--vfm", "tiny-random", "--precision", "fp32", "-q"]  # fp32: exact on every CPU


def write_converted(data_root: Path, name: str, count: int, seed: int = 0) -> Path:
    """``count`` random (image, label) pairs in the dataset's converted layout under ``data_root/<layout.root>``."""
    spec = load_dataset_spec(name)
    layout = spec.layout
    rng = np.random.default_rng(seed)
    # stored values: 0 is ignored and k -> k-1 with reduce_zero_label (Potsdam), else the class index
    high = spec.num_classes + 1 if spec.label_encoding.reduce_zero_label else spec.num_classes
    root = data_root / layout.root
    for folder in (layout.img_dir, layout.ann_dir):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        stem = f"tile_{index}"
        image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)  # non-square: labels are upsampled per tile
        label = rng.integers(0, high, (20, 28), dtype=np.uint8)
        Image.fromarray(image).save(root / layout.img_dir / f"{stem}{layout.img_suffix}")
        Image.fromarray(label).save(root / layout.ann_dir / f"{stem}{layout.ann_suffix}")
    return root


def run(*args: str):
    return CliRunner().invoke(main, ["eval", *args])


def table_row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coninfer-cache")


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(seed=0)


@pytest.fixture(autouse=True)
def shared_cache_and_model(monkeypatch, cache_dir, tiny_clip):
    """Text embeddings and eval state under one temporary CONINFER_CACHE; the tiny CLIP built once."""
    monkeypatch.setenv("CONINFER_CACHE", str(cache_dir))

    def build(seed: int = 0, *, settings: DenseCLIPSettings | None = None):
        model = copy.deepcopy(tiny_clip)
        model.settings = settings or DenseCLIPSettings()
        return model

    monkeypatch.setattr(tiny_module, "build_tiny_clip", build)


@pytest.fixture
def potsdam(tmp_path) -> Path:
    data_root = tmp_path / "data"
    write_converted(data_root, "Potsdam", 2)
    return data_root


def forbid_model_work(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a resumed, finished dataset must not load models or predict")

    for module, name in ((presets, "load_vlm"), (presets, "load_vfm"), (pipeline, "infer_tiles"),
                         (pipeline, "infer_labels")):
        monkeypatch.setattr(module, name, refuse)


class TestEvalOneDataset:
    def test_json_table_and_markdown(self, potsdam, tmp_path):
        output, markdown, state = tmp_path / "results.json", tmp_path / "results.md", tmp_path / "state"
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--context-size", "1", "--output", str(output),
                     "--markdown", str(markdown), "--state-dir", str(state))
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        assert set(entry) == {"dataset", "method", "metric", "value", "per_class", "aAcc", "n_images", "settings"}
        assert (entry["dataset"], entry["method"], entry["metric"], entry["n_images"]) == ("Potsdam", "ConInfer",
                                                                                           "mIoU", 2)
        assert list(entry["per_class"]) == list(load_dataset_spec("Potsdam").class_names)
        assert 0.0 <= entry["value"] <= 100.0
        settings = entry["settings"]
        assert (settings["vlm"], settings["vfm"], settings["context_size"], settings["limit"]) == (
            "tiny-random", "tiny-random", 1, None)
        assert settings["clip"] == asdict(DenseCLIPSettings("segearth", True, 0.6))
        assert settings["inference"]["method"] == "coninfer" and settings["inference"]["features"] == "vfm"
        # the table: ours, the paper's value and the difference in the Potsdam column of Table 1
        table = result.stdout
        assert "Table 1" in table and "Table 3" not in table
        column = table_row(table, "|").index("Potsdam")
        ours, paper = table_row(table, "ours: ConInfer"), table_row(table, "paper ConInfer")
        assert ours[column] == f"{entry['value']:.2f}" and paper[column] == "49.99"
        assert table_row(table, "Δ ours: ConInfer − paper ConInfer")[column] == f"{entry['value'] - 49.99:+.2f}"
        assert markdown.read_text().strip() == table.strip()
        [state_file] = state.glob("Potsdam-coninfer-*.json")
        assert json.loads(state_file.read_text())["n_done"] == 2

    def test_rerun_resumes_without_model_work(self, potsdam, tmp_path, cache_dir, monkeypatch):
        before = set((cache_dir / "eval").glob("*.json"))
        first = run("potsdam", "--data-root", str(potsdam / "potsdam"), *TINY, "--limit", "1",
                    "--output", str(tmp_path / "first.json"))
        assert first.exit_code == 0, first.output
        [state_file] = set((cache_dir / "eval").glob("*.json")) - before  # default: $CONINFER_CACHE/eval
        assert json.loads(state_file.read_text())["n_done"] == 1
        forbid_model_work(monkeypatch)
        second = run("potsdam", "--data-root", str(potsdam / "potsdam"), *TINY, "--limit", "1",
                     "--output", str(tmp_path / "second.json"))
        assert second.exit_code == 0, second.output
        assert json.loads((tmp_path / "second.json").read_text()) == json.loads((tmp_path / "first.json").read_text())
        assert second.stdout == first.stdout

    def test_rerun_after_the_data_changed_starts_over(self, potsdam, tmp_path):
        """More images converted since the last run: a fresh evaluation, not an error about the saved state."""
        args = ["Potsdam", "--data-root", str(potsdam), *TINY, "--state-dir", str(tmp_path / "state"),
                "--output", str(tmp_path / "results.json"), "--overwrite"]
        assert run(*args).exit_code == 0
        write_converted(potsdam, "Potsdam", 3, seed=5)  # tile_0, tile_1 rewritten and tile_2 added
        second = run(*args)
        assert second.exit_code == 0, second.output
        assert json.loads((tmp_path / "results.json").read_text())[0]["n_images"] == 3

    def test_partial_runs_are_marked_in_the_table(self, potsdam, tmp_path):
        """--limit or another context size than the paper's 50: the comparison is flagged under the table."""
        limited = run("Potsdam", "--data-root", str(potsdam), *TINY, "--limit", "1", "--context-size", "1",
                      "--state-dir", str(tmp_path / "state"))
        assert limited.exit_code == 0, limited.output
        assert "Potsdam (ConInfer): first 1 images (--limit), context size 1 (paper: 50)" in limited.stdout
        full = run("Potsdam", "--data-root", str(potsdam), *TINY, "--state-dir", str(tmp_path / "state"))
        assert full.exit_code == 0, full.output
        assert "--limit" not in full.stdout and "paper: 50" not in full.stdout

    def test_baseline_needs_no_vfm(self, potsdam, tmp_path, monkeypatch):
        def no_vfm(*args, **kwargs):
            raise AssertionError("the baseline must not load a VFM")

        monkeypatch.setattr(presets, "load_vfm", no_vfm)
        output = tmp_path / "baseline.json"
        result = run("Potsdam", "--data-root", str(potsdam), "--method", "baseline", *TINY, "--limit", "1",
                     "--output", str(output), "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        assert entry["method"] == "baseline" and entry["settings"]["vfm"] is None
        assert entry["settings"]["inference"]["method"] == "baseline"
        assert table_row(result.stdout, "paper MaskCLIP* (baseline)")  # compared with the paper's baseline row
        assert table_row(result.stdout, "Δ ours: baseline − paper MaskCLIP* (baseline)")

    @pytest.mark.parametrize(("option", "section", "key", "value", "label", "paper"), [
        (["--method", "decoupled"], "inference", "method", "decoupled", "ConInfer (decoupled)",
         "No joint-learning (Table 4)"),
        (["--vlm-variant", "gem"], "clip", "variant", "gem", "GEM+ConInfer", "ConInfer"),
        (["--method", "baseline", "--vlm-variant", "gem"], "clip", "variant", "gem", "GEM", "GEM"),
        (["--temperature", "20", "--iterations", "3"], "inference", "solver", {"temperature": 20.0, "iterations": 3},
         "ConInfer", "ConInfer"),
    ])  # fmt: skip
    def test_other_methods_run_end_to_end(self, potsdam, tmp_path, option, section, key, value, label, paper):
        output = tmp_path / "method.json"
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, *option, "--limit", "2", "--context-size", "2",
                     "--output", str(output), "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        found = entry["settings"][section][key]
        if isinstance(value, dict):
            found = {name: found[name] for name in value}
        assert found == value and 0.0 <= entry["value"] <= 100.0
        assert entry["method"] == label and table_row(result.stdout, f"paper {paper}")

    def test_segearth_ov_prior_under_coninfer(self, potsdam, tmp_path):
        output = tmp_path / "segov.json"
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--prior", "segearth-ov", "--upsampler",
                     "tiny-random", "--limit", "1", "--output", str(output), "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        assert entry["settings"]["inference"]["prior"] == "segearth-ov" and entry["settings"]["upsampler"] == "tiny-random"
        assert entry["method"] == "ConInfer + SegEarth-OV prior" and "segearth_ov" not in entry["settings"]
        assert table_row(result.stdout, "Δ ours: ConInfer + SegEarth-OV prior − paper ConInfer")

    @pytest.mark.parametrize(("protocol", "label", "prob_thd", "prompts", "windows"), [
        ([], "SegEarth-OV", 0.6, "segearth_ov", 2),  # the default of --method baseline --prior segearth-ov
        (["--segearth-protocol", "coninfer-rerun"], "SegEarth-OV (ConInfer re-run)", 0.4, "coninfer", 1),
    ])  # fmt: skip
    def test_segearth_ov_alone_under_each_protocol(self, tmp_path, small_segearth_ov, protocol, label, prob_thd,
                                                  prompts, windows):
        data_root = tmp_path / "data"
        write_converted(data_root, "WHU_Aerial", 2)
        output = tmp_path / "segov.json"
        result = run("WHU_Aerial", "--data-root", str(data_root), *TINY, "--method", "baseline", "--prior",
                     "segearth-ov", "--upsampler", "tiny-random", *protocol, "--output", str(output),
                     "--state-dir", str(tmp_path / "state"), "--context-size", "1")
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        settings = entry["settings"]
        assert (entry["method"], entry["n_images"], settings["vfm"], settings["prompts"]) == (label, 2, None, prompts)
        assert settings["segearth_ov"]["prob_thd"] == prob_thd and settings["segearth_ov"]["bg_index"] == 0
        assert small_segearth_ov == [windows] * 2  # every image predicted at its own size, its protocol's windows
        assert table_row(result.stdout, f"Δ ours: {label} − paper SegEarth-OV")
        assert "context size" not in result.stdout  # SegEarth-OV has no context: batches change nothing

    def test_table2_plug_and_play_row(self, tmp_path, small_segearth_ov):
        data_root = tmp_path / "data"
        write_converted(data_root, "OpenEarthMap", 1)
        result = run("OpenEarthMap", "--data-root", str(data_root), *TINY, "--method", "baseline", "--prior", "segearth-ov",
                     "--upsampler", "tiny-random", "--segearth-protocol", "coninfer-rerun", "--vlm-variant", "maskclip",
                     "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        assert "Table 2" in result.stdout and "Table 1" not in result.stdout  # shown once, where the paper has it
        assert table_row(result.stdout, "paper MaskCLIP+SegEarth-OV")[1:4] == ["25.94", "38.18", "47.75"]
        assert table_row(result.stdout, "Δ ours: MaskCLIP+SegEarth-OV − paper MaskCLIP+SegEarth-OV")[1] != "–"

    def test_compare_puts_earlier_results_beside_this_run(self, potsdam, tmp_path):
        baseline = tmp_path / "baseline.json"
        first = run("Potsdam", "--data-root", str(potsdam), *TINY, "--method", "baseline", "--limit", "1",
                    "--output", str(baseline), "--state-dir", str(tmp_path / "state"))
        assert first.exit_code == 0, first.output
        second = run("Potsdam", "--data-root", str(potsdam), *TINY, "--limit", "1", "--compare", str(baseline),
                     "--state-dir", str(tmp_path / "state"), "--output", str(tmp_path / "coninfer.json"))
        assert second.exit_code == 0, second.output
        assert table_row(second.stdout, "ours: baseline") and table_row(second.stdout, "ours: ConInfer")
        assert [e["method"] for e in json.loads((tmp_path / "coninfer.json").read_text())] == ["ConInfer"]

    def test_segearth_ov_needs_an_upsampler(self, potsdam):
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--method", "baseline", "--prior", "segearth-ov")
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "--upsampler" in result.output and "simfeatup-clip-b16" in result.output

    def test_labels_scored_on_the_device_give_the_same_json(self, potsdam, tmp_path, monkeypatch):
        """The tile step's labels stay tensors and are counted with torch; the JSON is that of host labels."""
        args = ["Potsdam", "--data-root", str(potsdam), *TINY, "--context-size", "1"]
        device = run(*args, "--output", str(tmp_path / "device.json"), "--state-dir", str(tmp_path / "s1"))
        assert device.exit_code == 0, device.output
        on_device = pipeline.infer_labels
        monkeypatch.setattr(pipeline, "infer_labels",
                            lambda *a, **k: [labels.cpu().numpy() for labels in on_device(*a, **k)])
        host = run(*args, "--output", str(tmp_path / "host.json"), "--state-dir", str(tmp_path / "s2"))
        assert host.exit_code == 0, host.output
        assert (tmp_path / "device.json").read_text() == (tmp_path / "host.json").read_text()

    def test_compile_reaches_both_encoders_once(self, potsdam, tmp_path, monkeypatch):
        compiled = []
        monkeypatch.setattr(pipeline, "compile_encoder", lambda encoder: compiled.append(type(encoder).__name__))
        monkeypatch.setattr(pipeline, "check_compile_available", lambda device: None)  # plumbing only: no g++ needed
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--compile", "--output",
                     str(tmp_path / "compiled.json"), "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        assert sorted(compiled) == ["DenseCLIP", "DenseVFM"]
        [entry] = json.loads((tmp_path / "compiled.json").read_text())
        assert "compile" not in json.dumps(entry["settings"])  # an execution detail, like the thread count
        compiled.clear()
        plain = run("Potsdam", "--data-root", str(potsdam), *TINY, "--output", str(tmp_path / "plain.json"),
                    "--state-dir", str(tmp_path / "state2"))
        assert plain.exit_code == 0, plain.output
        assert compiled == []

    def test_ablation_flags_reach_the_settings(self, potsdam, tmp_path, monkeypatch):
        monkeypatch.setattr(presets, "load_vfm", lambda *a, **k: pytest.fail("CLIP features need no VFM"))
        output = tmp_path / "ablation.json"
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--vlm-variant", "clearclip", "--attn-lambda",
                     "0.3", "--vfm-features", "clip", "--limit", "1", "--output", str(output),
                     "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        [entry] = json.loads(output.read_text())
        assert entry["settings"]["clip"] == asdict(DenseCLIPSettings("clearclip", True, 0.3))
        assert entry["settings"]["inference"]["features"] == "clip" and entry["settings"]["vfm"] is None


@pytest.fixture
def small_segearth_ov(monkeypatch) -> list[int]:
    """SegEarth-OV's protocols at a 64-px model size (48/16 windows for its own) instead of 448 (224/112): the
    same code path in a fraction of the time. Returns the number of windows of each image, in order."""
    from coninfer import segearth_ov

    original = segearth_ov.SegEarthOVSettings.for_dataset.__func__
    windows: list[int] = []

    def small(cls, dataset, protocol="segearth_ov", **overrides):
        sizes = {"resize_size": 64, **({"slide_crop": 48, "slide_stride": 16} if protocol == "segearth_ov" else {})}
        return original(cls, dataset, protocol, **sizes, **overrides)

    def counted(height, width, crop, stride):
        found = original_windows(height, width, crop, stride)
        windows.append(len(found))
        return found

    original_windows = segearth_ov.slide_windows
    monkeypatch.setattr(segearth_ov.SegEarthOVSettings, "for_dataset", classmethod(small))
    monkeypatch.setattr(segearth_ov, "slide_windows", counted)
    return windows


class TestEvalAll:
    def test_evaluates_present_datasets_and_names_the_missing(self, tmp_path):
        data_root = tmp_path / "data"
        write_converted(data_root, "Potsdam", 1)
        write_converted(data_root, "Inria", 1, seed=1)
        output = tmp_path / "all.json"
        result = run("all", "--data-root", str(data_root), *TINY, "--output", str(output),
                     "--state-dir", str(tmp_path / "state"))
        assert result.exit_code == 0, result.output
        entries = json.loads(output.read_text())
        assert [e["dataset"] for e in entries] == ["Potsdam", "Inria"]  # the paper's order
        assert entries[1]["metric"] == "IoU_foreground" and list(entries[1]["per_class"]) == ["background",
                                                                                              "building"]
        assert "Table 1" in result.stdout and "Table 3" in result.stdout
        assert table_row(result.stdout, "ours: ConInfer")[-1] != "–"
        skipped = next(line for line in result.stderr.splitlines() if "skipped" in line)  # even with -q
        missing = [n for n in dataset_names() if n not in ("Potsdam", "Inria")]
        assert all(f"{name} (" in skipped for name in missing) and "Potsdam" not in skipped

    def test_no_dataset_present_is_an_error(self, tmp_path):
        (tmp_path / "empty").mkdir()
        result = run("all", "--data-root", str(tmp_path / "empty"), *TINY)
        assert result.exit_code == 2
        assert result.output.count("\n") == 1 and "no benchmark found" in result.output

    def test_all_ignores_a_dataset_folder_given_as_root(self, potsdam):
        # data/potsdam itself has img_dir/val, which other datasets share; `all` must not evaluate it 5 times
        result = run("all", "--data-root", str(potsdam / "potsdam"), *TINY)
        assert result.exit_code == 2 and "no benchmark found" in result.output


class TestErrors:
    def test_missing_dataset_folder(self, potsdam):
        result = run("Inria", "--data-root", str(potsdam), *TINY)
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "Inria" in result.output and "coninfer data convert Inria" in result.output

    def test_unknown_dataset(self, potsdam):
        result = run("cityscapes", "--data-root", str(potsdam), *TINY)
        assert result.exit_code == 2 and "unknown dataset 'cityscapes'" in result.output

    def test_existing_output_needs_overwrite(self, potsdam, tmp_path):
        (tmp_path / "results.json").write_text("[]")
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, "--output", str(tmp_path / "results.json"))
        assert result.exit_code == 2 and "--overwrite" in result.output

    @pytest.mark.parametrize("option", [["--attn-lambda", "1.5"], ["--context-size", "0"], ["--limit", "0"]])
    def test_out_of_range_options(self, potsdam, option):
        result = run("Potsdam", "--data-root", str(potsdam), *TINY, *option)
        assert result.exit_code == 2 and option[0] in result.output
