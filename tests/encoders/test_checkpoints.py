"""Tests of coninfer.encoders.checkpoints.load_state_dict: TorchScript archives, wrappers, refused and broken files."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coninfer.encoders.checkpoints import load_state_dict, local_fingerprint, weights_fingerprint
from coninfer.encoders.load_clip import load_clip
from coninfer.encoders.tiny import build_tiny_clip
from coninfer.errors import CheckpointFormatError
from exporters import to_open_clip_state_dict


class _Node(torch.nn.Module):
    """A scriptable module; its children and parameters are attached by name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_tree(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose ``state_dict()`` has exactly these dotted names (as OpenAI's TorchScript CLIP has)."""
    root = _Node()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_buffer(leaf, tensor.clone())
    return root


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def openai_state(tiny) -> dict[str, torch.Tensor]:
    """Tiny CLIP under OpenAI names, in float16 and with the scalar metadata tensors OpenAI's archives carry."""
    state = {name: tensor.half() for name, tensor in to_open_clip_state_dict(tiny).items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(len(tiny.tokenizer)))
    return state


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, OpenAI files still use it
class TestTorchScript:
    @pytest.mark.parametrize("how", ["script", "trace"])
    def test_archive_loads_as_state_dict(self, openai_state, tmp_path: Path, how: str) -> None:
        module = _module_tree(openai_state)
        compiled = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.zeros(1))
        path = tmp_path / "ViT-tiny.pt"
        compiled.save(str(path))
        loaded = load_state_dict(path)
        assert set(loaded) == set(openai_state)
        for name, tensor in openai_state.items():
            assert torch.equal(loaded[name], tensor), name

    def test_openai_archive_loads_as_clip(self, tiny, openai_state, tmp_path: Path) -> None:
        path = tmp_path / "ViT-tiny.pt"
        torch.jit.script(_module_tree(openai_state)).save(str(path))
        tokenizer = tmp_path / "tokenizer"
        tiny.tokenizer.save_pretrained(str(tokenizer))
        loaded = load_clip(path, heads=4, text_heads=4, tokenizer=tokenizer)
        pixels = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
        # float16 weights, float32 model: equal up to the float16 rounding of the weights
        torch.testing.assert_close(loaded.dense_tokens(pixels), tiny.dense_tokens(pixels), atol=0.05, rtol=0.05)

    def test_broken_archive_is_a_format_error(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.pt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("broken/constants.pkl", b"not a pickle")
            archive.writestr("broken/code/__torch__/m.py", "junk")
        with pytest.raises(CheckpointFormatError, match="TorchScript"):
            load_state_dict(path)


class TestPickles:
    def test_whole_module_refused_with_a_clean_message(self, tmp_path: Path) -> None:
        path = tmp_path / "model.bin"
        torch.save(torch.nn.Linear(2, 2), path)
        with pytest.raises(CheckpointFormatError, match="refusing") as info:
            load_state_dict(path)
        assert "\x1b" not in str(info.value)  # no terminal colour codes from torch's message
        assert "nn.Module" in str(info.value)

    def test_training_wrapper_with_module_prefix(self, tmp_path: Path) -> None:
        state = {"visual.proj": torch.ones(2, 3), "visual.conv1.weight": torch.zeros(4, 3, 2, 2)}
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
        loaded = load_state_dict(path)
        assert set(loaded) == set(state) and torch.equal(loaded["visual.proj"], state["visual.proj"])

    @pytest.mark.parametrize("content", [b"abc", b"", b"PK\x03\x04 truncated zip"])
    def test_garbage_is_a_format_error(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "garbage.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointFormatError, match="garbage.pt"):
            load_state_dict(path)

    def test_garbage_safetensors(self, tmp_path: Path) -> None:
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"\x00" * 16)
        with pytest.raises(CheckpointFormatError, match="safetensors"):
            load_state_dict(path)
        save_file({"a": torch.zeros(1)}, str(path))
        assert set(load_state_dict(path)) == {"a"}


class TestFingerprints:
    def test_hub_cache_paths_name_repo_and_commit(self, tmp_path: Path) -> None:
        snapshot = tmp_path / "hub" / "models--chendelong--RemoteCLIP" / "snapshots" / "0123abc"
        assert weights_fingerprint(snapshot / "RemoteCLIP-ViT-B-32.pt") == "hub:chendelong/RemoteCLIP@0123abc"
        assert weights_fingerprint(snapshot / "ckpt" / "x.pt") == "hub:chendelong/RemoteCLIP@0123abc"
        assert weights_fingerprint(snapshot) == "hub:chendelong/RemoteCLIP@0123abc"
        other = tmp_path / "cache" / "snapshots" / "fedcba9"
        assert weights_fingerprint(other, repo_id="owner/name") == "hub:owner/name@fedcba9"

    def test_local_files_by_path_size_and_time(self, tmp_path: Path) -> None:
        path = tmp_path / "weights.safetensors"
        path.write_bytes(b"a" * 16)
        first = local_fingerprint(path)
        assert first.startswith("local:") and len(first) == len("local:") + 16
        assert weights_fingerprint(path) == first == local_fingerprint(path)
        path.write_bytes(b"b" * 16)  # same path, same size
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert local_fingerprint(path) != first
        copy = tmp_path / "copy.safetensors"
        copy.write_bytes(path.read_bytes())
        assert local_fingerprint(copy) != local_fingerprint(path)  # the path is part of it

    def test_folder_ignores_unrelated_files(self, tmp_path: Path) -> None:
        (tmp_path / "model.safetensors").write_bytes(b"w")
        before = local_fingerprint(tmp_path)
        (tmp_path / "notes.md").write_text("x")
        assert local_fingerprint(tmp_path) == before
        (tmp_path / "config.json").write_text("{}")
        assert local_fingerprint(tmp_path) != before
