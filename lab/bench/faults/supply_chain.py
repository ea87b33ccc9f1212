"""Scenario 8: supply chain. A CycloneDX SBOM of the installed environment
(``cyclonedx-py environment``, validated by the tool against the CycloneDX schema) and a
``pip-audit`` of the same environment.

The SBOM is written to ``artifacts/sbom/pumpwatch-environment.cdx.json`` (or
``PUMPWATCH_SBOM_PATH``). pip-audit asks PyPI's JSON API for known vulnerabilities of each
installed distribution: where that service cannot be reached (an offline machine, a registry
mirror without the JSON API) it audits nothing and says every dependency was skipped. Only that
condition — no dependency audited at all, for want of the service — is tolerated (reported as
"not audited"); any finding fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from lab.bench.faults.common import Lab, Outcome, Size
from lab.embedded import REPO_ROOT

DEFAULT_SBOM = REPO_ROOT / "artifacts" / "sbom" / "pumpwatch-environment.cdx.json"
KEY_PACKAGES = ("asyncpg", "fastapi", "paho-mqtt", "pydantic", "uvicorn", "msgspec")


def sbom_path() -> Path:
    return Path(os.environ.get("PUMPWATCH_SBOM_PATH") or DEFAULT_SBOM)


def write_sbom(path: Path) -> dict[str, Any]:
    """Write the environment's SBOM (CycloneDX 1.6 JSON, validated) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cyclonedx_py",
            "environment",
            "--of",
            "JSON",
            "--output-reproducible",
            "--validate",
            "--pyproject",
            str(REPO_ROOT / "pyproject.toml"),
            "-o",
            str(path),
            sys.executable,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def sbom_problems(document: dict[str, Any]) -> list[str]:
    """What is wrong with an SBOM of this environment: format, and the key packages present
    at their installed versions."""
    problems = []
    if document.get("bomFormat") != "CycloneDX":
        problems.append(f"bomFormat is {document.get('bomFormat')!r}")
    versions = {c.get("name", "").lower(): c.get("version") for c in document.get("components", [])}
    for name in KEY_PACKAGES:
        installed = metadata.version(name)
        if versions.get(name) != installed:
            problems.append(f"{name} {installed} is installed, the SBOM says {versions.get(name)}")
    return problems


Verdict = Literal["clean", "findings", "unreachable"]


@dataclass
class Audit:
    verdict: Verdict
    audited: int
    skipped: int
    findings: list[str] = field(default_factory=list)
    detail: str = ""


def classify(report: dict[str, Any]) -> Audit:
    """pip-audit's JSON report → clean, findings, or unreachable (nothing could be audited)."""
    dependencies = report.get("dependencies", [])
    findings = [
        f"{d['name']} {d['version']}: {v.get('id')} (fix: {', '.join(v.get('fix_versions') or [])})"
        for d in dependencies
        for v in d.get("vulns", [])
    ]
    skipped = [d for d in dependencies if "skip_reason" in d]
    audited = len(dependencies) - len(skipped)
    if findings:
        return Audit("findings", audited, len(skipped), findings)
    if audited == 0:
        reasons = {d["skip_reason"].split(":")[0] for d in skipped}
        return Audit("unreachable", 0, len(skipped), detail="; ".join(sorted(reasons)))
    return Audit("clean", audited, len(skipped))


def audit() -> Audit:
    """Run pip-audit on this environment (the project itself, installed editable, skipped)."""
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip_audit",
                "--format",
                "json",
                "--progress-spinner",
                "off",
                "--skip-editable",
                "--timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Audit("unreachable", 0, 0, detail="pip-audit timed out")
    try:
        report = json.loads(done.stdout)
    except ValueError:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "ConnectionError" in done.stderr or "NameResolutionError" in done.stderr:
            return Audit("unreachable", 0, 0, detail=error[:200])
        raise RuntimeError(f"pip-audit failed (exit {done.returncode}): {error}") from None
    return classify(report)


def run(lab: Lab, size: Size, seed: int) -> Outcome:
    outcome = Outcome("sbom", "CycloneDX SBOM of the environment, and pip-audit")
    started = time.monotonic()
    path = sbom_path()
    document = write_sbom(path)
    components = len(document.get("components", []))
    outcome.problems.extend(sbom_problems(document))
    outcome.figures["SBOM"] = f"{path} (CycloneDX {document.get('specVersion')}, validated)"
    outcome.figures["components"] = f"{components}"
    result = audit()
    outcome.attempted = components
    outcome.acknowledged = result.audited
    outcome.figures["pip-audit"] = {
        "clean": f"{result.audited} audited, no known vulnerability ({result.skipped} skipped)",
        "findings": f"{len(result.findings)} known vulnerabilities",
        "unreachable": f"NOT AUDITED: the vulnerability service was unreachable ({result.detail})",
    }[result.verdict]
    for finding in result.findings:
        outcome.problems.append(f"vulnerable: {finding}")
    outcome.elapsed_s = time.monotonic() - started
    return outcome
