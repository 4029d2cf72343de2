"""Safe checkpoint loading and hub access shared by every encoder.

Only tensors are ever loaded: safetensors, or ``torch.load(weights_only=True)``. A pickle that needs to run
code to unpickle is refused. Hub errors (gated repository, no network) become one-line errors that say what
to do. Format-specific key conversion lives next to each model (``load_clip.py``, ``load_vfm.py``).

Fingerprints (``encoder.fingerprint``) name the weights a model was loaded from, for resume keys: a hub file or
snapshot by its repository and commit, a local file or folder by path, size and modification time of each file.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from coninfer.errors import CheckpointFormatError, InputFileError, ModelLoadError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "model_state_dict")


def load_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU, running no foreign code.

    ``.safetensors`` is read with safetensors; ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``.
    A TorchScript archive (OpenAI's original CLIP ``.pt`` files) is read with ``torch.jit.load``, which runs no
    Python code. Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, a ``module.`` prefix) are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"checkpoint not found: {path}", hint="check the path or use a preset name")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointFormatError(f"cannot read {path} as safetensors: {error}") from error
    if _is_torchscript_archive(path):
        logger.info("%s is a TorchScript archive; reading its parameters with torch.jit.load", path)
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # torch raises RuntimeError and others for damaged archives
            raise CheckpointFormatError(f"cannot read {path} as a TorchScript archive: {_first_line(error)}",
                                        hint="the file is damaged or incomplete; download it again") from error
        return unwrap_state_dict({name: tensor.detach().clone() for name, tensor in module.state_dict().items()})
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own first line is generic advice (with terminal colour codes), not the reason
        raise CheckpointFormatError(
            f"refusing to load {path}: it is a pickle that needs arbitrary code to load (e.g. a whole nn.Module, "
            "or training objects next to the weights)",
            hint="convert it to .safetensors in an environment you trust, or use a safetensors copy of the weights",
        ) from error
    except Exception as error:  # garbage makes torch's unpickler fail with IndexError, KeyError, ... too
        raise CheckpointFormatError(f"cannot read {path} as a torch checkpoint: {_first_line(error)}",
                                    hint="the file is damaged, incomplete or not a checkpoint") from error
    if not isinstance(content, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(content).__name__}, not a state dict of tensors")
    return unwrap_state_dict(content)


def unwrap_state_dict(content: Mapping) -> StateDict:
    """Strip training wrappers so that keys start at the model's own names."""
    for key in _WRAPPER_KEYS:
        inner = content.get(key) if isinstance(content, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            content = inner
            break
    tensors = {name: value for name, value in content.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError("checkpoint holds no tensors", hint="pass the file with the model weights")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return tensors


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
              ignore_missing: tuple[str, ...] = (), ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Copy ``state_dict`` into ``module``, naming every missing/unexpected key and every shape mismatch.

    ``ignore_*`` hold key substrings that may legitimately be absent/extra (buffers, unused heads).
    """
    own = module.state_dict()
    mismatched = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}"
        for name, tensor in state_dict.items()
        if name in own and tuple(own[name].shape) != tuple(tensor.shape)
    ]
    if mismatched:
        raise CheckpointFormatError(
            f"{source}: shape mismatch for {mismatched[0]}" + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""),
            hint="the checkpoint is for a different architecture; pass the matching preset or explicit sizes",
        )
    missing = [n for n in own if n not in state_dict and not any(s in n for s in ignore_missing)]
    unexpected = [n for n in state_dict if n not in own and not any(s in n for s in ignore_unexpected)]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors, e.g. {missing[0]!r}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
        raise CheckpointFormatError(f"{source}: {'; '.join(detail)}", hint="is this the right checkpoint format?")
    module.load_state_dict(state_dict, strict=False)


# files of a model folder whose change changes the model: weights and the configs next to them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt")


def local_fingerprint(path: str | Path) -> str:
    """``local:<16 hex>``: a digest of the resolved path, size and ``mtime_ns`` of the file (or of every weight and
    config file directly in the folder), so that a checkpoint replaced at the same path gets another fingerprint."""
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256(str(path).encode())
    for file in files:
        stat = file.stat()
        digest.update(f"\n{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f"local:{digest.hexdigest()[:16]}"


def weights_fingerprint(path: str | Path, *, repo_id: str | None = None) -> str:
    """``hub:<repo>@<commit>`` for a file or snapshot folder in the Hugging Face cache (``models--<owner>--<name>/
    snapshots/<commit>/...``: the commit huggingface_hub resolved the revision to), else :func:`local_fingerprint`.

    ``repo_id`` names the repository when the cache folder does not (a cache kept under another layout).
    """
    parts = Path(path).parts
    if "snapshots" in parts[1:-1]:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        folder = parts[index - 1]
        repo = repo_id or ("/".join(folder[len("models--"):].split("--")) if folder.startswith("models--") else None)
        if repo and index + 1 < len(parts):
            return f"hub:{repo}@{parts[index + 1]}"
    return local_fingerprint(path)


def hub_download(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """Download one file of a hub repository into the Hugging Face cache, with errors that say what to do."""
    with hub_errors(repo_id):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision))


def hub_snapshot(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) a whole hub repository, with errors that say what to do."""
    with hub_errors(repo_id):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))


class hub_errors:  # noqa: N801 - used as a context manager, reads like a function
    """Translate huggingface_hub/transformers download errors into :class:`ModelLoadError`."""

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, error, traceback) -> bool:
        if error is None or isinstance(error, ModelLoadError):
            return False
        from huggingface_hub import errors as hub

        repo = self.repo_id
        text = _first_line(error)
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, hub.GatedRepoError) or status in (401, 403) or "gated" in text.lower():
            raise ModelLoadError(
                f"{repo} is a gated repository and this machine has no access to it",
                hint=f"accept its licence on huggingface.co/{repo} and run `hf auth login`, "
                "use the ungated timm copy (preset dinov3-l16-sat), or pass a local path",
            ) from error
        if isinstance(error, hub.RepositoryNotFoundError):
            raise ModelLoadError(f"{repo} was not found on the hub", hint="check the name, or pass a local path") from error
        if isinstance(error, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, OSError, ConnectionError)):
            import os

            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            hint = ("HF_HUB_OFFLINE is set: unset it on a machine with internet to download once, or pass a local path"
                    if offline else
                    "connect to the internet once (`coninfer models download NAME`), or pass a local path")
            raise ModelLoadError(
                f"cannot get {repo}: not in the local cache and the hub cannot be reached ({text})", hint=hint
            ) from error
        return False


def _is_torchscript_archive(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
