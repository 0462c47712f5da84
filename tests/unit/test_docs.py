"""Every YAML example in the docs loads as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.scenario.loader import load_text

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _yaml_blocks() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 2
            out.append((doc.name, line, m.group(1)))
    return out


@pytest.mark.parametrize(("doc", "line", "block"), _yaml_blocks(),
                         ids=[f"{d}:{n}" for d, n, _ in _yaml_blocks()])
def test_docs_yaml_example_loads(doc: str, line: int, block: str) -> None:
    load_text(block, f"{doc}:{line}")


def test_docs_have_examples() -> None:
    assert len(_yaml_blocks()) >= 6


def test_docs_python_examples_are_the_example_tests() -> None:
    """Each python block of docs/pytest.md stands, verbatim, in tests/examples/."""
    text = (ROOT / "docs" / "pytest.md").read_text()
    examples = "\n".join(p.read_text() for p in sorted((ROOT / "tests" / "examples").glob("*.py")))
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 3
    for block in blocks:
        assert block.strip() in examples, f"not in tests/examples:\n{block}"


def test_docs_dns_example_answers_as_the_reference_says() -> None:
    from harness.analysis.dns import NotFound, ScenarioDns, TempError

    (block,) = [b for _, _, b in _yaml_blocks() if b.startswith("scenario: dns-example\n")]
    dns = ScenarioDns(load_text(block, "scenarios.md").dns)
    assert dns.query("lab.test", "TXT") == ["v=spf1 ip4:127.0.0.1 -all"]
    assert dns.query("mx.lab.test", "A") == ["127.0.0.1"]
    assert dns.query("host.wild.test", "A") == ["192.0.2.1"]  # the wildcard
    assert dns.query("1.0.0.127.in-addr.arpa", "PTR") == ["mx.lab.test"]
    with pytest.raises(TempError):
        dns.query("broken.test", "TXT")
    with pytest.raises(NotFound):
        dns.query("nowhere.test", "A")
