"""The documentation stays true: the recipe reference is the schema's, the README is a short front door whose
links all lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.schema_docs import recipe_reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current() -> None:
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == recipe_reference_markdown(), (
        "docs/recipes.md is out of date: run `nvae-search schema --markdown > docs/recipes.md`"
    )


def test_recipe_reference_lists_every_field() -> None:
    from nvae_search.schema import recipe_json_schema

    page = recipe_reference_markdown()
    schema = recipe_json_schema()
    for definition in [schema, *schema["$defs"].values()]:
        for name in definition.get("properties", {}):
            assert f"| `{name}` |" in page, name


def test_schema_markdown_command_prints_the_page() -> None:
    result = CliRunner().invoke(app, ["schema", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == recipe_reference_markdown()


def test_readme_is_short_and_its_links_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), f"README links to missing {link}"


def test_docs_pages_link_to_existing_files() -> None:
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in link:
                assert (page.parent / link).exists(), f"{page.name} links to missing {link}"
