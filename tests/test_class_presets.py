"""Tests of coninfer.class_presets: every benchmark's prompt list as a --classes text."""

from __future__ import annotations

import pytest

from coninfer.class_presets import class_preset, preset_names
from coninfer.errors import InputError
from coninfer.evaluate.specs import load_dataset_spec
from coninfer.prompts import ClassList


@pytest.mark.parametrize("name", preset_names())
def test_preset_is_the_evaluation_prompt_list(name: str) -> None:
    spec = load_dataset_spec(name)
    classes = ClassList.parse(class_preset(name))
    assert classes.names == tuple(c.queries[0] for c in spec.classes)
    assert classes.queries == tuple(q for c in spec.classes for q in c.queries)
    assert [classes.synonyms(c.index) for c in spec.classes] == [c.queries for c in spec.classes]


def test_openearthmap_text_and_spelling() -> None:
    expected = "background;bareland,barren;grass;pavement;road;tree,forest;water,river;cropland;building,roof,house"
    assert class_preset("openearthmap") == expected
    assert class_preset("Open-Earth_Map") == expected
    assert len(preset_names()) == 17


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(InputError, match="unknown class preset 'openearth'") as info:
        class_preset("openearth")
    assert "--classes-preset" in info.value.hint and "LoveDA" in info.value.hint and "OpenEarthMap" in info.value.hint
