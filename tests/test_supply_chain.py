"""Supply chain: the CycloneDX SBOM of the environment lists what is installed, and pip-audit
finds no known vulnerability. pip-audit asks PyPI's JSON API; where that service cannot be
reached it audits nothing, and only that condition is tolerated (the test then skips, saying
so): a finding always fails."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from lab.bench.faults import supply_chain
from lab.bench.faults.supply_chain import classify


def test_the_sbom_lists_the_installed_packages_at_their_versions(tmp_path: Path) -> None:
    document = supply_chain.write_sbom(tmp_path / "sbom.cdx.json")
    assert document["bomFormat"] == "CycloneDX"
    assert document["specVersion"] == "1.6"
    assert supply_chain.sbom_problems(document) == []
    names = {c["name"].lower(): c for c in document["components"]}
    assert names["asyncpg"]["version"] == metadata.version("asyncpg")
    assert names["asyncpg"]["purl"].startswith("pkg:pypi/asyncpg@")
    assert document["metadata"]["component"]["name"] == "pumpwatch"


def test_sbom_problems_name_a_missing_or_wrong_package() -> None:
    document = {
        "bomFormat": "CycloneDX",
        "components": [{"name": "asyncpg", "version": "0.0.1"}],
    }
    problems = supply_chain.sbom_problems(document)
    assert any(
        p.startswith(f"asyncpg {metadata.version('asyncpg')} is installed") for p in problems
    )
    assert any(p.startswith("fastapi ") for p in problems)


def test_findings_fail_and_only_an_unreachable_service_is_tolerated() -> None:
    vulnerable = {
        "dependencies": [
            {
                "name": "jinja2",
                "version": "3.1.2",
                "vulns": [{"id": "GHSA-x", "fix_versions": ["3.1.3"]}],
            },
            {"name": "asyncpg", "version": "0.29.0", "vulns": []},
            {
                "name": "pumpwatch",
                "skip_reason": "Dependency not found on PyPI and could not be audited",
            },
        ]
    }
    result = classify(vulnerable)
    assert result.verdict == "findings"
    assert result.findings == ["jinja2 3.1.2: GHSA-x (fix: 3.1.3)"]
    clean = {"dependencies": vulnerable["dependencies"][1:]}
    assert classify(clean).verdict == "clean"
    assert (classify(clean).audited, classify(clean).skipped) == (1, 1)
    nothing_audited = {
        "dependencies": [
            {
                "name": n,
                "skip_reason": f"Dependency not found on PyPI and could not be audited: {n}",
            }
            for n in ("asyncpg", "fastapi")
        ]
    }
    unreachable = classify(nothing_audited)
    assert unreachable.verdict == "unreachable"
    assert "not found on PyPI" in unreachable.detail
    # A finding is never excused by skipped packages.
    assert (
        classify(
            {"dependencies": [*nothing_audited["dependencies"], vulnerable["dependencies"][0]]}
        ).verdict
        == "findings"
    )


def test_pip_audit_finds_no_known_vulnerability() -> None:
    result = supply_chain.audit()
    assert result.findings == [], "\n".join(result.findings)
    if result.verdict == "unreachable":
        pytest.skip(f"not audited: the vulnerability service was unreachable ({result.detail})")
    assert result.verdict == "clean"
    assert result.audited > 0
