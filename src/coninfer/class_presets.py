"""Class lists of the benchmark datasets, for ``coninfer segment --classes-preset openearthmap``.

A preset is the prompt list the evaluation uses for that dataset (``coninfer.data/datasets.yaml``, ConInfer's
``prompts/cls_*.txt``): the same classes, in label order, with the same synonyms, in the ``--classes`` syntax
(``;`` between classes, ``,`` between synonyms), so a scene segmented with a preset gets the benchmark's labels.
"""

from __future__ import annotations

from coninfer.errors import InputError
from coninfer.evaluate.specs import canonical_name, dataset_names, load_dataset_spec


def preset_names() -> tuple[str, ...]:
    """The presets: the benchmark datasets' names, in the paper's order."""
    return dataset_names()


def class_preset(name: str) -> str:
    """The ``--classes`` text of dataset ``name`` (case, "-", "_" and "." ignored): ``"background;bareland,..."``.

    Raises:
        InputError: an unknown name; the hint lists the valid ones.
    """
    try:
        canonical = canonical_name(name)
    except InputError:
        raise InputError(f"unknown class preset {name!r}",
                         hint=f"pass --classes-preset with one of {', '.join(preset_names())}") from None
    return ";".join(load_dataset_spec(canonical).class_lines)


__all__ = ["class_preset", "preset_names"]
