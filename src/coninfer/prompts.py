"""Class lists, synonyms, prompt templates and text embeddings of the queries (with an on-disk cache).

A *class* is one output label; a *query* is one text that votes for it. The official class files hold one class
per line with comma-separated synonyms (``road,parking lot``); every synonym is a separate query and the
post-processing keeps, per class, the maximum probability over its queries.

A query's embedding is the ImageNet prompt ensemble of CLIP: encode ``template.format(query)`` for the 80
templates, L2-normalise each, average, L2-normalise again. Text encoders are passed in as a plain callable
``encode_text(list[str]) -> (n, E) tensor``, so this module does not depend on any model code.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from coninfer import _fs
from coninfer._fs import atomic_path
from coninfer.errors import InputError, InputFileError

logger = logging.getLogger(__name__)

EncodeText = Callable[[list[str]], torch.Tensor]

TEMPLATE_FILE = "imagenet_templates.txt"
_CACHE_SUBDIR = "text_embeddings"


@dataclass(frozen=True)
class ClassList:
    """The classes of a segmentation task and the text queries that stand for them.

    names: display name of each class (its first synonym), in class-index order.
    queries: every synonym of every class, in file order.
    query_to_class: for each query, the index of its class (non-decreasing, covers every class).
    """

    names: tuple[str, ...]
    queries: tuple[str, ...]
    query_to_class: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "queries", tuple(self.queries))
        object.__setattr__(self, "query_to_class", tuple(int(c) for c in self.query_to_class))
        if len(self.names) < 2:
            raise InputError(
                f"names: a class list needs at least 2 classes, got {len(self.names)} ({list(self.names)})",
                hint="add a background class, e.g. 'background;building'",
            )
        for field_name, values in (("names", self.names), ("queries", self.queries)):
            for value in values:
                if not isinstance(value, str) or not value.strip():
                    raise InputError(f"{field_name}: empty class name or synonym {value!r}",
                                     hint="remove stray commas/semicolons or empty lines")
        if len(self.query_to_class) != len(self.queries):
            raise InputError(
                f"query_to_class: {len(self.query_to_class)} entries for {len(self.queries)} queries",
                hint="give one class index per query",
            )
        if set(self.query_to_class) != set(range(len(self.names))):
            raise InputError(
                f"query_to_class: {list(self.query_to_class)} must use every class index 0..{len(self.names) - 1}",
                hint="every class needs at least one query",
            )
        seen: dict[str, str] = {}
        for query in self.queries:
            # CLIP's tokenizer lower-cases and collapses whitespace, so these would be the same embedding.
            key = _query_identity(query)
            if key in seen:
                raise InputError(f"queries: duplicate query {query!r} (same as {seen[key]!r})",
                                 hint="each synonym may appear only once in the whole class list")
            seen[key] = query

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def synonyms(self, class_index: int) -> tuple[str, ...]:
        """All queries of class ``class_index``, in file order."""
        return tuple(q for q, c in zip(self.queries, self.query_to_class, strict=True) if c == class_index)

    @classmethod
    def from_names(cls, classes: Iterable[str]) -> ClassList:
        """One string per class; each may list comma-separated synonyms (``["road,parking lot", "building"]``).

        Whitespace around each synonym is stripped. The official code splits on ``","`` without stripping, so
        ``"road, parking lot"`` there gives the query ``" parking lot"``; stripping is what users expect, and it
        changes nothing for the official class files, which contain no spaces around commas.
        """
        names: list[str] = []
        queries: list[str] = []
        query_to_class: list[int] = []
        for class_index, entry in enumerate(classes):
            if not isinstance(entry, str):
                raise InputError(f"classes: entry {class_index} is a {type(entry).__name__}, not a string",
                                 hint="pass class names as strings")
            synonyms = [s.strip() for s in entry.split(",")]
            if not all(synonyms):
                raise InputError(f"classes: class {class_index} ({entry!r}) has an empty name or synonym",
                                 hint="remove stray commas, e.g. 'road,parking lot'")
            names.append(synonyms[0])
            queries.extend(synonyms)
            query_to_class.extend([class_index] * len(synonyms))
        return cls(names=tuple(names), queries=tuple(queries), query_to_class=tuple(query_to_class))

    @classmethod
    def parse(cls, text: str) -> ClassList:
        """Parse a command-line class list: ``;`` separates classes, ``,`` synonyms (``"building,roof;road"``)."""
        if not text or not text.strip():
            raise InputError("classes: empty class list", hint="pass e.g. 'background;building,roof;road'")
        return cls.from_names(text.split(";"))

    @classmethod
    def from_file(cls, path: str | Path) -> ClassList:
        """Read an official class file: one class per line (line order = class index), comma-separated synonyms.

        Trailing empty lines are ignored; an empty line between classes is an error, because skipping it would
        shift every later class index.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError as error:
            raise InputFileError(f"class file not found: {path}", hint="check the path") from error
        except (OSError, UnicodeDecodeError) as error:
            raise InputFileError(f"cannot read class file {path}: {error}",
                                 hint="it must be a UTF-8 text file") from error
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise InputError(f"{path}: line {number} is empty", hint="one class per line, no blank lines")
        return cls.from_names(lines)


def _query_identity(query: str) -> str:
    return re.sub(r"\s+", " ", query.strip()).casefold()


def load_templates() -> tuple[str, ...]:
    """The 80 ``openai_imagenet_template`` prompts (``"a photo of a {}."``), from the package data file."""
    text = resources.files("coninfer").joinpath("data", TEMPLATE_FILE).read_text(encoding="utf-8")
    templates = tuple(line for line in text.splitlines() if line.strip())
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise InputError(f"template {bad[0]!r} must contain exactly one '{{}}'", hint="reinstall coninfer")
    return templates


def embed_queries(
    queries: Sequence[str],
    encode_text: EncodeText,
    *,
    templates: Sequence[str],
    model_key: str,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Prompt-ensemble embeddings of the queries, (K, E) float32 on the CPU, rows of unit L2 norm.

    ``encode_text(texts)`` returns (len(texts), E); it is called once per query not found in the cache, with
    all templates filled with that query. The cache is one safetensors file per ``model_key`` under
    ``cache_dir`` (default :func:`coninfer._fs.cache_dir`), with one entry per (query, template set); the
    ``model_key`` must identify the text encoder's weights (``DenseCLIP.text_model_key`` does).
    """
    queries = list(queries)
    templates = list(templates)
    if not queries:
        raise InputError("queries: no queries to embed", hint="pass at least one class name")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise InputError("templates: each template needs exactly one '{}'", hint="e.g. 'a photo of a {}.'")
    templates_hash = _sha256("\n".join(templates))
    keys = [_sha256(f"{query}\0{templates_hash}")[:40] for query in queries]
    cache_file = _cache_file(cache_dir, model_key) if use_cache else None
    cached = _read_cache(cache_file) if cache_file is not None else {}
    fresh: dict[str, torch.Tensor] = {}
    rows: list[torch.Tensor] = []
    for query, key in zip(queries, keys, strict=True):
        if key not in cached and key not in fresh:
            fresh[key] = _ensemble(query, encode_text, templates)
        rows.append(cached[key] if key in cached else fresh[key])
    if fresh and cache_file is not None:
        _write_cache(cache_file, {**cached, **fresh}, model_key)
    return torch.stack(rows)


def _ensemble(query: str, encode_text: EncodeText, templates: list[str]) -> torch.Tensor:
    """(E,) unit vector: mean of the L2-normalised embeddings of every template filled with ``query``."""
    texts = [template.replace("{}", query) for template in templates]
    embeddings = torch.as_tensor(encode_text(texts)).detach().to(device="cpu", dtype=torch.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
        raise InputError(
            f"encode_text returned shape {tuple(embeddings.shape)} for {len(texts)} texts",
            hint="encode_text must return one row per text",
        )
    mean = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=0)
    return torch.nn.functional.normalize(mean, dim=0)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cache_file(cache_dir: str | Path | None, model_key: str) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else _fs.cache_dir()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)[-60:].strip("._") or "model"
    return folder / _CACHE_SUBDIR / f"{readable}-{_sha256(model_key)[:16]}.safetensors"


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as error:  # a truncated or foreign file: recompute rather than fail
        logger.warning("ignoring unreadable text-embedding cache %s (%s)", path, error)
        return {}


def _write_cache(path: Path, entries: dict[str, torch.Tensor], model_key: str) -> None:
    from safetensors.torch import save_file

    # Written to a temporary name and renamed, so a concurrent reader never sees half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            save_file({k: v.contiguous() for k, v in entries.items()}, str(temporary), metadata={"model_key": model_key})
    except OSError as error:  # OutputError is an OSError too
        logger.warning("cannot write the text-embedding cache %s (%s); continuing without it", path, error)
