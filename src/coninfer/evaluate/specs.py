"""Typed view of the 17 benchmark datasets (``coninfer/data/datasets.yaml``) and the paper's numbers.

A :class:`DatasetSpec` holds everything evaluation needs about one benchmark: the classes with the exact ConInfer
query words, the label encoding, the ConInfer settings of the paper's config, where images and labels live and which
metric the paper reports. ``load_dataset_spec("loveda")`` finds a dataset case-insensitively.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from coninfer.errors import InputError

MULTI_CLASS = "multi-class"
SINGLE_CLASS = "single-class"
METRIC_MIOU = "mIoU"
METRIC_FOREGROUND_IOU = "IoU_foreground"
_DINOV3_BACKBONES = ("dinov3_vitl16", "dinov3_vith16plus")
_DINOV3_WEIGHTS = ("sat493m", "lvd1689m")
# the vfm preset of each of the paper's DINOv3s
VFM_PRESETS = {"dinov3_vitl16_sat493m": "dinov3-l16-sat", "dinov3_vith16plus_lvd1689m": "dinov3-h16plus-lvd"}
# Eval protocol: the reference code normalises every DINOv3's input with the SAT-493M statistics, also the LVD-1689M
# ViT-H+ (UAVid, VDD) trained on ImageNet statistics. Evaluation therefore takes the statistics of this preset
# for every VFM, not those of the VFM's own weights.
EVAL_VFM_NORMALIZATION_PRESET = "dinov3-l16-sat"


def _require(condition: bool, owner: str, field: str, value: object, hint: str) -> None:
    if not condition:
        raise InputError(f"{owner}: bad {field} {value!r}", hint=hint)


@dataclass(frozen=True)
class ClassSpec:
    """One class: its label index, its name and the query words ConInfer prompts it with (synonyms)."""

    index: int
    name: str
    queries: tuple[str, ...]
    segearth_queries: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _require(self.index >= 0, "ClassSpec", "index", self.index, "class indices start at 0")
        _require(bool(self.name), "ClassSpec", "name", self.name, "give the class a name")
        _require(
            len(self.queries) > 0 and all(q and "," not in q for q in self.queries),
            "ClassSpec",
            "queries",
            self.queries,
            "give at least one non-empty query word without commas",
        )

    @property
    def line(self) -> str:
        """The class's line of ConInfer's ``prompts/cls_*.txt``: synonyms joined by "," without spaces."""
        return ",".join(self.queries)


@dataclass(frozen=True)
class LabelEncoding:
    """How stored label values become evaluation indices.

    ``reduce_zero_label`` (mmseg): at load time 0 -> ``ignore_index``, k -> k - 1 (LoveDA, Potsdam, Vaihingen).
    Pixels equal to ``ignore_index`` after loading are left out of every metric. Binary remaps (255 -> 1 and the
    like) are done once by the converter and described in ``converter_remap``.
    """

    reduce_zero_label: bool
    ignore_index: int
    eval_index_to_class: tuple[str, ...]
    stored_values: str = ""
    converter_remap: str = ""

    def __post_init__(self) -> None:
        _require(
            0 <= self.ignore_index <= 255,
            "LabelEncoding",
            "ignore_index",
            self.ignore_index,
            "labels are 8-bit; use 255",
        )
        _require(
            len(self.eval_index_to_class) > 0,
            "LabelEncoding",
            "eval_index_to_class",
            self.eval_index_to_class,
            "list the class of every evaluation index",
        )


@dataclass(frozen=True)
class ConInferSettings:
    """The per-dataset settings of ConInfer's config (``configs_ConInfer/cfg_*.py`` merged with the base config).

    ``vfm_backbone``/``vfm_weights``: DINOv3 ViT-H+/16 LVD-1689M for UAVid and VDD, ViT-L/16 SAT-493M otherwise
    (preset :attr:`vfm_preset`). :attr:`vfm_normalization` is the eval protocol's pixel statistics: those of
    preset :data:`EVAL_VFM_NORMALIZATION_PRESET` (SAT-493M) for every dataset, as the reference code does.
    ``batch_size`` is the context size: the number of images one Gaussian mixture is fitted over.
    ``baseline_prob_thd`` is the threshold of the MaskCLIP* baseline config (``configs_baseline``).
    """

    prob_thd: float
    bg_index: int
    gmm_temp: float
    attn_lambda: float
    logit_scale: float
    vfm_backbone: str
    vfm_weights: str
    batch_size: int = 50
    baseline_prob_thd: float = 0.0

    def __post_init__(self) -> None:
        owner = "ConInferSettings"
        _require(0.0 <= self.prob_thd <= 1.0, owner, "prob_thd", self.prob_thd, "a probability in [0, 1]")
        _require(self.bg_index >= 0, owner, "bg_index", self.bg_index, "a class index >= 0")
        _require(self.gmm_temp > 0, owner, "gmm_temp", self.gmm_temp, "a positive temperature")
        _require(0.0 <= self.attn_lambda <= 1.0, owner, "attn_lambda", self.attn_lambda, "a weight in [0, 1]")
        _require(self.logit_scale > 0, owner, "logit_scale", self.logit_scale, "a positive scale")
        _require(self.vfm_backbone in _DINOV3_BACKBONES, owner, "vfm_backbone", self.vfm_backbone, f"one of {_DINOV3_BACKBONES}")
        _require(self.vfm_weights in _DINOV3_WEIGHTS, owner, "vfm_weights", self.vfm_weights, f"one of {_DINOV3_WEIGHTS}")
        _require(self.batch_size >= 1, owner, "batch_size", self.batch_size, "at least 1 image per context")

    @property
    def vfm(self) -> str:
        """``"dinov3_vitl16_sat493m"`` or ``"dinov3_vith16plus_lvd1689m"``."""
        return f"{self.vfm_backbone}_{self.vfm_weights}"

    @property
    def vfm_preset(self) -> str:
        """The vfm preset of :attr:`vfm` (``dinov3-l16-sat`` or ``dinov3-h16plus-lvd``)."""
        if self.vfm not in VFM_PRESETS:
            raise InputError(f"no vfm preset for {self.vfm!r}", hint=f"known: {', '.join(VFM_PRESETS)}")
        return VFM_PRESETS[self.vfm]

    @property
    def vfm_normalization(self):
        """The eval protocol's VFM pixel statistics (a :class:`~coninfer.encoders.Normalization`), read from the
        presets: :data:`EVAL_VFM_NORMALIZATION_PRESET`'s, whatever :attr:`vfm` is."""
        from coninfer.encoders.presets import get_preset

        return get_preset(EVAL_VFM_NORMALIZATION_PRESET, "vfm").normalization

    @property
    def vfm_mean(self) -> tuple[float, float, float]:
        return self.vfm_normalization.mean

    @property
    def vfm_std(self) -> tuple[float, float, float]:
        return self.vfm_normalization.std


@dataclass(frozen=True)
class DatasetLayout:
    """Where a converted dataset's files live, relative to its folder (``data_root``).

    ``root`` names that folder inside a SegEarth-OV style ``data/`` folder (e.g. ``potsdam``). Images are
    ``img_dir/<stem><img_suffix>``, labels ``ann_dir/<stem><ann_suffix>``. ``split_file`` (WBS-SI only) lists the
    stems to evaluate, one per line; without it every image in ``img_dir`` is evaluated.
    """

    root: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    ann_suffix: str
    split_file: str | None = None

    def __post_init__(self) -> None:
        for field in ("root", "img_dir", "ann_dir", "img_suffix", "ann_suffix"):
            value = getattr(self, field)
            _require(bool(value), "DatasetLayout", field, value, "every layout path must be set")
        for field in ("root", "img_dir", "ann_dir"):
            value = getattr(self, field)
            _require(not value.startswith("/") and ".." not in value.split("/"), "DatasetLayout", field, value, "use a relative path")


@dataclass(frozen=True)
class ConverterInfo:
    """What ``coninfer data convert`` expects in RAW_DIR (``raw_layout``) and what the reference script did."""

    script: str | None
    does: str
    raw_layout: str

    @property
    def as_released(self) -> bool:
        """True when the reference repos use the release as is (UDD5, VDD): conversion only copies and checks."""
        return self.script is None


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: classes, label encoding, ConInfer settings, file layout and metric."""

    name: str
    task: str
    metric: str
    foreground_index: int | None
    classes: tuple[ClassSpec, ...]
    label_encoding: LabelEncoding
    coninfer: ConInferSettings
    layout: DatasetLayout
    converter: ConverterInfo
    split: str
    paper_tables: tuple[str, ...]
    eval_set_size: int | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        owner = f"DatasetSpec {self.name!r}"
        _require(self.task in (MULTI_CLASS, SINGLE_CLASS), owner, "task", self.task, f"{MULTI_CLASS} or {SINGLE_CLASS}")
        expected_metric = METRIC_MIOU if self.task == MULTI_CLASS else METRIC_FOREGROUND_IOU
        _require(self.metric == expected_metric, owner, "metric", self.metric, f"{self.task} datasets report {expected_metric}")
        _require(
            [c.index for c in self.classes] == list(range(len(self.classes))),
            owner,
            "classes",
            [c.index for c in self.classes],
            "class indices must be 0, 1, ... in order",
        )
        _require(
            self.label_encoding.eval_index_to_class == self.class_names,
            owner,
            "label_encoding.eval_index_to_class",
            self.label_encoding.eval_index_to_class,
            f"must equal the class names {self.class_names}",
        )
        if self.task == SINGLE_CLASS:
            _require(
                self.foreground_index is not None and 0 <= self.foreground_index < self.num_classes,
                owner,
                "foreground_index",
                self.foreground_index,
                "single-class datasets name the index of their foreground class",
            )
        _require(self.coninfer.bg_index < self.num_classes, owner, "coninfer.bg_index", self.coninfer.bg_index, "a class index")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def class_lines(self) -> list[str]:
        """One "syn1,syn2,..." line per class, as in ConInfer's prompt file (for ``ClassList.from_names``)."""
        return [c.line for c in self.classes]

    @property
    def is_single_class(self) -> bool:
        return self.task == SINGLE_CLASS

    def paper_value(self, method: str = "ConInfer", table: str | None = None) -> float | None:
        """The paper's value of this dataset's metric for ``method`` (first table that has it), else None."""
        for row in paper_results(self.name, table=table, method=method):
            if row.metric == self.metric:
                return row.value
        return None


@dataclass(frozen=True)
class PaperResult:
    """One number of the paper's tables (``paper_results.csv``)."""

    table: str
    method: str
    dataset: str
    metric: str
    value: float


def _normalise(name: str) -> str:
    # "WHU_Sat_II", "whu-sat-ii" and the paper's "WHUSat.II" all become "whusatii".
    return re.sub(r"[\s_\-.]", "", name).lower()


_ALIASES = {"uavidimg": "UAVid"}


@functools.lru_cache(maxsize=1)
def _raw_specs() -> dict[str, Any]:
    text = resources.files("coninfer").joinpath("data", "datasets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _build_spec(name: str, raw: Mapping[str, Any]) -> DatasetSpec:
    encoding = raw["label_encoding"]
    index_to_class = encoding["eval_index_to_class"]
    coninfer = raw["coninfer"]
    layout = raw["layout"]
    return DatasetSpec(
        name=name,
        task=raw["task"],
        metric=raw["metric"],
        foreground_index=raw["foreground_index"],
        classes=tuple(
            ClassSpec(
                index=c["index"],
                name=c["name"],
                queries=tuple(c["coninfer_queries"]),
                segearth_queries=tuple(c["segearth_queries"]) if "segearth_queries" in c else None,
            )
            for c in raw["classes"]
        ),
        label_encoding=LabelEncoding(
            reduce_zero_label=encoding["reduce_zero_label"],
            ignore_index=encoding["ignore_index"],
            eval_index_to_class=tuple(index_to_class[i] for i in sorted(index_to_class)),
            stored_values=encoding["stored_values"],
            converter_remap=encoding["converter_remap"],
        ),
        coninfer=ConInferSettings(
            prob_thd=float(coninfer["prob_thd"]),
            bg_index=int(coninfer["bg_idx"]),
            gmm_temp=float(coninfer["gmm_temp"]),
            attn_lambda=float(coninfer["attn_lambda"]),
            logit_scale=float(coninfer["logit_scale"]),
            vfm_backbone=coninfer["dinov3_backbone"],
            vfm_weights=coninfer["dinov3_weights"],
            batch_size=int(coninfer["batch_size"]),
            baseline_prob_thd=float(raw["baseline_maskclip_star"]["prob_thd"]),
        ),
        layout=DatasetLayout(
            root=layout["root"],
            img_dir=layout["img_dir"],
            ann_dir=layout["ann_dir"],
            img_suffix=layout["img_suffix"],
            ann_suffix=layout["ann_suffix"],
            split_file=layout["split_file"],
        ),
        converter=ConverterInfo(
            script=raw["converter"]["script"],
            does=raw["converter"]["does"],
            raw_layout=raw["converter"]["raw_layout"],
        ),
        split=raw["split"],
        paper_tables=tuple(raw["paper_tables"]),
        eval_set_size=raw["eval_set_size"],
        notes=tuple(raw.get("notes") or ()),
    )


@functools.lru_cache(maxsize=1)
def _all_specs() -> dict[str, DatasetSpec]:
    return {name: _build_spec(name, raw) for name, raw in _raw_specs()["datasets"].items()}


def dataset_names() -> tuple[str, ...]:
    """The 17 dataset names in the paper's order (Table 1 then Table 3)."""
    return tuple(_all_specs())


def canonical_name(name: str) -> str:
    """The dataset's name as spelled in ``datasets.yaml`` (case, "-", "_" and "." are ignored)."""
    key = _normalise(name)
    by_key = {_normalise(n): n for n in dataset_names()}
    by_key.update(_ALIASES)
    if key not in by_key:
        raise InputError(
            f"unknown dataset {name!r}",
            hint=f"choose one of {', '.join(dataset_names())} (case-insensitive)",
        )
    return by_key[key]


def load_dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case-insensitive, e.g. "loveda", "whu-sat-ii")."""
    return _all_specs()[canonical_name(name)]


@functools.lru_cache(maxsize=1)
def _paper_rows() -> tuple[PaperResult, ...]:
    text = resources.files("coninfer").joinpath("data", "paper_results.csv").read_text(encoding="utf-8")
    return tuple(
        PaperResult(row["table"], row["method"], row["dataset"], row["metric"], float(row["value"]))
        for row in csv.DictReader(io.StringIO(text))
    )


def paper_results(
    dataset: str | None = None, table: str | None = None, method: str | None = None
) -> list[PaperResult]:
    """Rows of the paper's tables, filtered by dataset (case-insensitive; "Average" allowed), table and method."""
    if dataset is not None and _normalise(dataset) != "average":
        dataset = canonical_name(dataset)
    rows = _paper_rows()
    if table is not None and all(r.table != table for r in rows):
        tables = sorted({r.table for r in rows})
        raise InputError(f"unknown paper table {table!r}", hint=f"choose one of {', '.join(tables)}")
    return [
        r
        for r in rows
        if (dataset is None or _normalise(r.dataset) == _normalise(dataset))
        and (table is None or r.table == table)
        and (method is None or r.method == method)
    ]


def datasets_of_table(table: str) -> tuple[str, ...]:
    """Datasets whose spec lists ``table`` among its paper tables, in the paper's column order."""
    return tuple(n for n in dataset_names() if table in _all_specs()[n].paper_tables)
