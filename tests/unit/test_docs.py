"""The documentation stays true to the code: the config reference is the schema's, the README stays a short
manual that names every command, and no link points at a file that is not there."""

import argparse
import re
from pathlib import Path

import pytest

from sasft_ray.cli import main, parser
from sasft_ray.config_reference import markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
REGENERATE = "sasft config --reference > docs/config.md"


def test_config_reference_is_generated_from_the_schema():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text == markdown(), f"docs/config.md is not what the schema says: regenerate it with `{REGENERATE}`"
    assert REGENERATE in text.splitlines()[0]


def test_config_reference_covers_every_section_and_the_sections_own_defaults():
    text = markdown()
    for key in ("run_dir", "selftalk.engine.max_num_seqs", "serve.engine.max_num_seqs", "mix.sources[].weight",
                "eval.suites[].path", "eval.lm_eval[].tasks", "train.lora.r", "mix.external.path"):
        assert f"| `{key}` |" in text, key
    assert "| `selftalk.engine.max_num_seqs` | int, ≥ 1 | `128` |" in text
    assert "| `serve.engine.max_num_seqs` | int, ≥ 1 | `32` |" in text  # serve.engine's own default
    assert "| `run_dir` | str | required |" in text
    assert "| `mix.sources[].weight` | float, > 0 | required |" in text


def test_sasft_config_reference_needs_no_config(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == markdown()
    assert main(["config"]) == 2  # neither a config nor --reference
    assert "--reference" in capsys.readouterr().err


def test_readme_is_a_short_manual():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it a manual of at most 250 (details: docs/)"


def test_readme_holds_exactly_the_two_setup_commands_ci_runs():
    text = README.read_text()
    block = text.split("<!-- setup -->", 1)[1].split("<!-- /setup -->", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("```")]
    assert len(commands) == 2, commands


def test_the_install_pins_every_package_to_the_constraints_file_within_the_projects_ranges():
    """The README installs with `-c .ci/constraints.txt`, which pins every package to one release (the same
    environment on every day), each of the project's requirements (its `cpu` and `dev` extras' too) in range."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert f"-c {CONSTRAINTS.relative_to(ROOT)} " in README.read_text()
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            assert [spec.operator for spec in req.specifier] == ["=="], line
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    for req in map(Requirement, requires("sasft-ray")):
        if canonicalize_name(req.name) == "sasft-ray" or (
                req.marker and not any(req.marker.evaluate({"extra": extra}) for extra in ("cpu", "dev"))):
            continue
        pin = pins.get(canonicalize_name(req.name))
        assert pin and req.specifier.contains(pin, prereleases=True), f"{req}: the constraints file pins {pin}"


def _links(path: Path) -> list[str]:
    """Markdown link targets outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path):
    missing = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same file
        if not (path.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def _commands(p: argparse.ArgumentParser, prefix: str = "sasft") -> list[str]:
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix} {name}")
                out += nested or [f"{prefix} {name}"]
    return out


def test_readme_names_every_sub_command():
    text = README.read_text()
    commands = _commands(parser())
    assert "sasft run" in commands and "sasft lab build" in commands
    missing = [c for c in commands if not re.search(re.escape(c) + r"\b", text)]
    assert not missing, f"README.md does not mention {missing}"
