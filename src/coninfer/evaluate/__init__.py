"""Benchmark evaluation without mmcv: dataset specs, converters, loaders, mmseg-compatible metrics, a resumable
runner and paper-comparison reports.

Typical use (``predict_batch`` maps a list of (H, W, 3) uint8 images to (H, W) class maps)::

    from coninfer.evaluate import convert_dataset, evaluate_dataset, format_report, load_dataset_spec
    convert_dataset("Potsdam", "downloads/potsdam", "data/potsdam")
    result = evaluate_dataset(load_dataset_spec("Potsdam"), "data/potsdam", predict_batch, state_path="potsdam.json")
    print(format_report([result]))
"""

from __future__ import annotations

from coninfer.evaluate.converters import ConversionSummary, convert_dataset, converter_kind
from coninfer.evaluate.loaders import (
    Sample,
    iter_pairs,
    list_samples,
    read_image,
    read_label,
    resolve_data_root,
)
from coninfer.evaluate.metrics import ConfusionMatrix, IoUScores
from coninfer.evaluate.report import format_report, format_table, read_results_json, write_results_json
from coninfer.evaluate.runner import EvalResult, evaluate_dataset
from coninfer.evaluate.specs import (
    ClassSpec,
    ConInferSettings,
    DatasetLayout,
    DatasetSpec,
    LabelEncoding,
    PaperResult,
    dataset_names,
    datasets_of_table,
    load_dataset_spec,
    paper_results,
)

__all__ = [
    "ClassSpec",
    "ConInferSettings",
    "ConfusionMatrix",
    "ConversionSummary",
    "DatasetLayout",
    "DatasetSpec",
    "EvalResult",
    "IoUScores",
    "LabelEncoding",
    "PaperResult",
    "Sample",
    "convert_dataset",
    "converter_kind",
    "dataset_names",
    "datasets_of_table",
    "evaluate_dataset",
    "format_report",
    "format_table",
    "iter_pairs",
    "list_samples",
    "load_dataset_spec",
    "paper_results",
    "read_image",
    "read_label",
    "read_results_json",
    "resolve_data_root",
    "write_results_json",
]
