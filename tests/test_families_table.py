"""The README's family table is the registry's rendering, and every family it says exports is proven by a test."""

from __future__ import annotations

import pytest
from conftest import REPO

from onnxpipe.export import families


def test_the_readme_table_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert families.render_readme(readme) == readme, (
        "README.md's family table is stale: run python -m onnxpipe.export.families --write README.md"
    )


def test_the_registry_is_consistent():
    assert families.check() == []


@pytest.mark.parametrize("family", [f for f in families.FAMILIES if f.status == families.EXPORTS], ids=lambda f: f.key)
def test_a_family_that_exports_has_tests_that_mention_it(family):
    for name in family.tests:
        path = REPO / "tests" / name
        assert path.is_file(), f"{family.key}: {name} does not exist"
        assert family.key.lower() in path.read_text(encoding="utf-8").lower(), f"{name} never mentions {family.key!r}"


def test_render_readme_replaces_only_the_table():
    text = f"intro\n{families.MARK_START}\nold table\n{families.MARK_END}\noutro\n"
    assert (
        families.render_readme(text)
        == f"intro\n{families.MARK_START}\n{families.markdown()}{families.MARK_END}\noutro\n"
    )
    with pytest.raises(ValueError):
        families.render_readme("no markers")


def test_describe_and_failure_notes():
    assert families.describe("xlm-roberta").startswith("XLM-RoBERTa (exports; tested: text-classification")
    assert families.describe("xlm_roberta") == families.describe("xlm-roberta")  # either spelling
    assert families.describe("no-such-type") is None
    assert len(families.families_for("m2m_100")) == 2  # M2M100 and NLLB share the model type
    assert "ModernBERT is tested for" in families.failure_note("modernbert", "text-generation")
