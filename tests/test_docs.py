"""The docs agree with the code: a generated reference, links that resolve, examples that run.

A setting added without a description, or without regenerating docs/configuration.md, fails
here; so does a moved page that leaves a link behind, and a Python example in
docs/producers.md that no longer gets a result from a real worker.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import redis

from pushfw.worker.settings import WorkerSettings
from pushfw.worker.settings_doc import render
from tests.conftest import RedisServer
from tests.daemon import Daemon, worker_env

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)
    ]


def test_configuration_doc_is_generated_from_the_settings() -> None:
    """Regenerate with: python -m pushfw.worker.settings_doc > docs/configuration.md"""
    assert (ROOT / "docs" / "configuration.md").read_text() == render()


def test_every_setting_has_a_description() -> None:
    missing = [name for name, f in WorkerSettings.model_fields.items() if not f.description]
    assert missing == []


def test_every_setting_is_one_row_of_the_reference() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `(PUSHFW_\w+)` \|", render(), flags=re.MULTILINE)
    assert rows == [(name, f"PUSHFW_{name.upper()}") for name in WorkerSettings.model_fields]


def test_the_pages_exist() -> None:
    names = {p.name for p in PAGES}
    for page in (
        "operating.md",
        "configuration.md",
        "producers.md",
        "security.md",
        "internals.md",
        "integrations.md",
        "benchmarks.md",
    ):
        assert page in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link names a file that exists, and a heading there if it has a #part."""
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        path = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target}: no heading #{fragment} in {path.name}")
    assert broken == []


def test_readme_starts_with_the_two_commands() -> None:
    """CI and people rely on scripts/demo and scripts/test being the README's first commands."""
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    assert any(line.startswith("scripts/demo ") for line in head)
    assert any(line.startswith("scripts/test ") for line in head)


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert not re.search(r"\bissue \d+|the benchmark issue", readme, flags=re.IGNORECASE)


def python_examples() -> list[str]:
    text = (ROOT / "docs" / "producers.md").read_text()
    return re.findall(r"<!-- example-python -->\n```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_python_examples_are_found() -> None:
    assert len(python_examples()) == 2


@pytest.mark.parametrize("number", range(2))
def test_python_example_gets_a_result(
    number: int, r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each Python example in docs/producers.md, against a real Redis and worker, prints it."""
    config = tmp_path / "worker.toml"
    config.write_text("")
    env = worker_env(
        config, redis_url=redis_server.url, host_name="docs1", backend="memory", block_ms="50"
    )
    code = python_examples()[number].replace("redis://redis.example:6379/0", redis_server.url)
    out = io.StringIO()
    namespace: dict[str, object] = {}
    with Daemon(env) as worker:
        worker.wait_line("ready: following")
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"docs/producers.md example {number}", "exec"), namespace)
    for value in namespace.values():  # an example's client, closed now, not whenever GC runs
        if isinstance(value, redis.Redis):
            value.close()
    assert "docs1" in out.getvalue()
    assert "applied" in out.getvalue()


def completion_block() -> str:
    """The commands docs/operating.md gives for shell completion (its fenced block)."""
    section = (ROOT / "docs" / "operating.md").read_text().split("### Shell completion", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_documented_completion_commands_write_scripts_that_complete(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent  # where pushfw and pushfw-worker are installed
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euc", completion_block()], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    bash_dir = tmp_path / ".local/share/bash-completion/completions"
    for command, typed, expected in (
        ("pushfw", "dr", "drop"),
        ("pushfw-worker", "check-c", "check-config"),
        ("pushfw-worker check-config", "--con", "--connect"),
    ):
        program = command.split()[0]
        script = bash_dir / program
        # what bash does on TAB: the script's function, with the words typed so far
        words = f"{command} {typed}"
        completed = subprocess.run(
            [
                "bash",
                "-c",
                f'source "$0"; COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}; '
                f"_{program.replace('-', '_')}_completion {program}; "
                'printf "%s\\n" "${COMPREPLY[@]}"',
                str(script),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.split() == [expected], words
    for program in ("pushfw", "pushfw-worker"):
        zsh = (tmp_path / ".zfunc" / f"_{program}").read_text()
        assert zsh.startswith(f"#compdef {program}\n")
        assert f"compdef _{program.replace('-', '_')}_completion {program}" in zsh
