"""Tests of coninfer.prompts: class lists, templates, prompt-ensemble embeddings and their cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coninfer._fs import cache_dir
from coninfer.errors import InputError, InputFileError
from coninfer.prompts import ClassList, embed_queries, load_templates


class TestClassList:
    def test_from_file_official_format(self, tmp_path: Path) -> None:
        path = tmp_path / "cls_potsdam.txt"
        path.write_text("road,parking lot\nbuilding\nlow vegetation\ntree\ncar\nclutter,background\n\n")
        classes = ClassList.from_file(path)
        assert classes.names == ("road", "building", "low vegetation", "tree", "car", "clutter")
        assert classes.queries == ("road", "parking lot", "building", "low vegetation", "tree", "car", "clutter",
                                   "background")
        assert classes.query_to_class == (0, 0, 1, 2, 3, 4, 5, 5)
        assert classes.num_classes == 6 and classes.num_queries == 8
        assert classes.synonyms(5) == ("clutter", "background")

    def test_from_file_strips_whitespace_and_bom(self, tmp_path: Path) -> None:
        path = tmp_path / "classes.txt"
        path.write_text("\ufeffbackground , clutter\r\n  building\r\n", encoding="utf-8")
        classes = ClassList.from_file(path)
        assert classes.queries == ("background", "clutter", "building")
        assert classes.names == ("background", "building")

    def test_parse_cli_string(self) -> None:
        classes = ClassList.parse("building,roof;road;water")
        assert classes.names == ("building", "road", "water")
        assert classes.queries == ("building", "roof", "road", "water")
        assert classes.query_to_class == (0, 0, 1, 2)

    def test_from_names_allows_synonyms(self) -> None:
        classes = ClassList.from_names(["background", "paved road, road"])
        assert classes.queries == ("background", "paved road", "road")
        assert classes.query_to_class == (0, 1, 1)

    @pytest.mark.parametrize("text", ["a,,b;c", "a;;c", "a;b,", " ;b", ""])
    def test_empty_names_rejected(self, text: str) -> None:
        with pytest.raises(InputError, match="empty"):
            ClassList.parse(text)

    @pytest.mark.parametrize("text", ["road;building,Road", "road;road", "low  vegetation;low vegetation"])
    def test_duplicate_queries_rejected(self, text: str) -> None:
        with pytest.raises(InputError, match="duplicate"):
            ClassList.parse(text)

    def test_single_class_rejected(self) -> None:
        with pytest.raises(InputError, match="at least 2 classes") as info:
            ClassList.parse("building,roof")
        assert "background" in info.value.hint

    def test_blank_line_between_classes_rejected(self, tmp_path: Path) -> None:
        path = tmp_path / "classes.txt"
        path.write_text("background\n\nbuilding\n")
        with pytest.raises(InputError, match="line 2 is empty"):
            ClassList.from_file(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InputFileError, match="not found"):
            ClassList.from_file(tmp_path / "nope.txt")

    def test_direct_construction_is_validated(self) -> None:
        with pytest.raises(InputError, match="query_to_class"):
            ClassList(names=("a", "b"), queries=("a", "b"), query_to_class=(0, 0))
        with pytest.raises(InputError, match="query_to_class"):
            ClassList(names=("a", "b"), queries=("a",), query_to_class=(0, 1))


class TestTemplates:
    def test_eighty_templates_from_package_data(self, spec_dir: Path) -> None:
        templates = load_templates()
        assert len(templates) == 80
        assert all(t.count("{}") == 1 for t in templates)
        assert templates[0] == "a bad photo of a {}."
        spec = [line for line in (spec_dir / "imagenet_templates.txt").read_text().splitlines() if line]
        assert list(templates) == spec


class _FakeEncoder:
    """encode_text stand-in: a deterministic vector per text, counting its calls."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            generator = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
            rows.append(torch.randn(self.dim, generator=generator) * (1 + len(text)))
        return torch.stack(rows)


class TestEmbedQueries:
    TEMPLATES = ("a photo of a {}.", "{} seen from above", "satellite image of {}")

    def test_prompt_ensemble_average(self, tmp_path: Path) -> None:
        encoder = _FakeEncoder()
        result = embed_queries(["road", "building"], encoder, templates=self.TEMPLATES, model_key="fake",
                               cache_dir=tmp_path)
        assert result.shape == (2, 8) and result.dtype == torch.float32
        raw = encoder(["a photo of a road.", "road seen from above", "satellite image of road"])
        expected = torch.nn.functional.normalize(torch.nn.functional.normalize(raw, dim=-1).mean(0), dim=0)
        torch.testing.assert_close(result[0], expected)
        torch.testing.assert_close(result.norm(dim=-1), torch.ones(2))
        assert encoder.calls[0] == ["a photo of a road.", "road seen from above", "satellite image of road"]

    def test_cache_hit_skips_encoding(self, tmp_path: Path) -> None:
        encoder = _FakeEncoder()
        first = embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="fake", cache_dir=tmp_path)
        second = embed_queries(["road", "road"], encoder, templates=self.TEMPLATES, model_key="fake",
                               cache_dir=tmp_path)
        assert len(encoder.calls) == 1
        torch.testing.assert_close(second[1], first[0], rtol=0, atol=0)
        assert len(list((tmp_path / "text_embeddings").glob("*.safetensors"))) == 1

    def test_cache_is_keyed_by_model_and_templates(self, tmp_path: Path) -> None:
        encoder = _FakeEncoder()
        embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="a", cache_dir=tmp_path)
        embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="b", cache_dir=tmp_path)
        embed_queries(["road"], encoder, templates=self.TEMPLATES[:2], model_key="a", cache_dir=tmp_path)
        embed_queries(["Road"], encoder, templates=self.TEMPLATES, model_key="a", cache_dir=tmp_path)
        assert len(encoder.calls) == 4

    def test_default_cache_dir_from_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CONINFER_CACHE", str(tmp_path / "cache"))
        assert cache_dir() == tmp_path / "cache"
        encoder = _FakeEncoder()
        embed_queries(["water"], encoder, templates=self.TEMPLATES, model_key="m")
        assert list((tmp_path / "cache" / "text_embeddings").glob("*.safetensors"))
        monkeypatch.delenv("CONINFER_CACHE")
        assert cache_dir() == Path.home() / ".cache" / "coninfer"

    def test_corrupt_cache_is_recomputed(self, tmp_path: Path) -> None:
        encoder = _FakeEncoder()
        embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="m", cache_dir=tmp_path)
        (cache_file,) = (tmp_path / "text_embeddings").glob("*.safetensors")
        cache_file.write_bytes(b"not a safetensors file")
        again = embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="m", cache_dir=tmp_path)
        assert len(encoder.calls) == 2 and again.shape == (1, 8)

    def test_use_cache_false_writes_nothing(self, tmp_path: Path) -> None:
        encoder = _FakeEncoder()
        embed_queries(["road"], encoder, templates=self.TEMPLATES, model_key="m", cache_dir=tmp_path, use_cache=False)
        assert not (tmp_path / "text_embeddings").exists()

    def test_bad_inputs(self, tmp_path: Path) -> None:
        with pytest.raises(InputError, match="no queries"):
            embed_queries([], _FakeEncoder(), templates=self.TEMPLATES, model_key="m", cache_dir=tmp_path)
        with pytest.raises(InputError, match="template"):
            embed_queries(["a"], _FakeEncoder(), templates=["no placeholder"], model_key="m", cache_dir=tmp_path)
        with pytest.raises(InputError, match="returned shape"):
            embed_queries(["a"], lambda texts: torch.zeros(1, 4), templates=self.TEMPLATES, model_key="m",
                          cache_dir=tmp_path)
