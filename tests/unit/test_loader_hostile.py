"""The loader against hostile text (issue 11): file paths refused when the
caller says so (the API), without a look at the disk; nesting bounded;
PyYAML's own failures turned into positioned problems."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.errors import ScenarioError
from harness.scenario.loader import MAX_DEPTH, build_rule, load_text, load_zone_text


def problems(text: str, **kw: bool) -> list[str]:
    with pytest.raises(ScenarioError) as e:
        load_text(text, "t.yaml", **kw)
    return [str(p) for p in e.value.problems]


def test_loader_hostile_files_refused_without_touching_them(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    cert.chmod(0)  # and unreadable: a look at it would change the answer
    text = f"server:\n  tls: {{cert: {cert}, key: /etc/shadow}}\n"
    got = problems(text, allow_files=False)
    assert got == [
        "t.yaml:2:15: tls cert names a file on the server (file paths are only for scenarios "
        "loaded from the CLI or a config, not for one sent over the API; use tls: "
        "{certificate: ...} to have one made)",
        f"t.yaml:2:{22 + len(str(cert))}: tls key names a file on the server (file paths are "
        "only for scenarios loaded from the CLI or a config, not for one sent over the API; "
        "use tls: {certificate: ...} to have one made)"]
    os.chmod(cert, 0o600)


def test_loader_hostile_one_file_key_alone_is_refused_the_same_way() -> None:
    assert problems("server: {tls: {key: k.pem}}\n", allow_files=False) == [
        "t.yaml:1:21: tls key names a file on the server (file paths are only for scenarios "
        "loaded from the CLI or a config, not for one sent over the API; use tls: "
        "{certificate: ...} to have one made)"]


def test_loader_hostile_files_allowed_by_default(tmp_path: Path) -> None:
    # the CLI and config path: the files are checked, as before
    got = problems(f"server: {{tls: {{cert: {tmp_path}/c.pem, key: {tmp_path}/k.pem}}}}\n")
    assert all("does not exist" in p for p in got) and len(got) == 2


def test_loader_hostile_made_certificate_allowed_over_the_api() -> None:
    s = load_text("server: {starttls: offer, tls: {certificate: self_signed}}\n", "t.yaml",
                  allow_files=False)
    assert s.server.tls.cert is None


def test_loader_hostile_zone_refuses_files_too() -> None:
    with pytest.raises(ScenarioError) as e:
        load_zone_text("server: {tls: {cert: /etc/passwd, key: /etc/passwd}}\n"
                       "dns: {lab.test: {A: [127.0.0.1]}}\n", "<zone>", allow_files=False)
    assert "names a file on the server" in str(e.value)


@pytest.mark.parametrize("text", [
    "a: " + "[" * 10_000 + "]" * 10_000,
    "rules: " + "{a: " * 2000 + "1" + "}" * 2000,
    "".join(f"{'  ' * i}k{i}:\n" for i in range(300)),
])
def test_loader_hostile_deep_nesting_is_a_positioned_problem(text: str) -> None:
    got = problems(text)
    assert len(got) == 1 and f"nested deeper than {MAX_DEPTH} levels" in got[0]
    assert got[0].startswith("t.yaml:")


def test_loader_hostile_nesting_up_to_the_bound_is_read_as_usual() -> None:
    got = problems("tags: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))
    assert "nested deeper" not in " ".join(got)


def test_loader_hostile_escape_past_unicode() -> None:
    assert problems('summary: ok\nrules:\n  - name: "a\\U00A012CF"\n') == [
        "t.yaml:3:13: not valid YAML: an escape names no Unicode character "
        "(the largest is \\U0010FFFF)"]


def test_loader_hostile_empty_rule_name() -> None:
    assert problems("rules:\n  - {name: '', on: rcpt, reply: 550 5.1.1 No}\n") == [
        "t.yaml:2:12: name is empty (leave it out to be called 'rule 1')"]


def test_loader_hostile_rule_values_too_deep_or_circular() -> None:
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    circular: dict[str, object] = {"on": "rcpt"}
    circular["when"] = circular
    for spec in ({"on": "rcpt", "reply": "550 5.1.1 x", "when": {"rcpt": deep}}, circular):
        with pytest.raises(ScenarioError) as e:
            build_rule(spec, source="<api>")
        assert str(e.value).startswith("<api>:1:1: the rule nests deeper than 32 levels")
