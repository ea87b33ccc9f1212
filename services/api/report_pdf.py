"""The patient report as PDF (fpdf2: pure Python, no system libraries). The same facts and
words as the HTML page (services/api/reports.py), laid out for A4."""

from __future__ import annotations

import io
import re
from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from services.api.reports import Report, local, who
from services.api.web.dose_chart import percent

# The PDF's core fonts speak Latin-1: what the pages write beyond it, said in it.
_LATIN1 = str.maketrans(
    {
        "\u2014": "-",
        "\u2013": "-",
        "\u2192": "->",
        "\u2190": "<-",
        "\u26a0": "!",
        "\u2026": "...",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
    }
)


def _text(value: object) -> str:
    return str(value).translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


class _Pdf(FPDF):
    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Helvetica", size=8)
        self.set_text_color(85, 94, 104)
        self.cell(0, 6, _text(f"{self.footer_text} - page {self.page_no()}/{{nb}}"), align="C")


def render(report: Report) -> bytes:
    tz = report.tz
    pdf = _Pdf(format="A4")
    pdf.set_title(_text(f"Patient report: {report.patient.display_name}"))
    pdf.set_creator("pumpwatch")
    pdf.footer_text = _text(
        f"pumpwatch patient report, {report.patient.display_name}, generated "
        f"{local(report.generated_at, tz)}"
    )
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    _line(pdf, f"Patient report: {report.patient.display_name}", 8)
    pdf.set_font("Helvetica", size=9)
    born = f" - born {report.patient.birth_date}" if report.patient.birth_date else ""
    _line(pdf, f"MRN {report.patient.mrn}{born} - {report.clinic_name}")
    _line(
        pdf,
        f"Period {local(report.since, tz)} to {local(report.until, tz)} - times in {tz}",
    )

    _heading(pdf, "Therapy")
    current = report.current
    if current is None:
        _line(pdf, "No reading of the patient's pump in this period.")
    else:
        for label, value in (
            ("Pump", current.serial),
            ("Drug", current.drug or "-"),
            ("Concentration", f"{current.concentration_mcg_per_ml:g} mcg/mL"),
            ("Dose", f"{current.daily_dose_mcg:g} mcg/day"),
            ("Rate", f"{current.rate_ml_per_day:g} mL/day"),
            ("Mode", current.mode),
            ("Since", local(current.at, tz)),
        ):
            pdf.set_font("Helvetica", "B", 10)
            pdf.cell(35, 5.5, _text(label))
            pdf.set_font("Helvetica", size=10)
            _line(pdf, value, 5.5)

    _heading(pdf, "Dose history")
    _chart(pdf, report.chart())
    pdf.set_font("Helvetica", size=9)
    for words in report.tolerance_words():
        _line(pdf, words, 4.8)
        pdf.ln(1)
    if report.therapy:
        _table(
            pdf,
            ("From", "Dose", "Change", "Concentration", "Mode", "Pump"),
            (30, 26, 28, 44, 22, 30),
            [
                (
                    local(c.at, tz),
                    f"{c.daily_dose_mcg:g} mcg/day",
                    "in force"
                    if i == 0 and c.at <= report.since
                    else percent(c.dose_change)
                    + "".join(f"; {w} changed" for w in c.changed if w != "dose")
                    if c.dose_change is not None
                    else ", ".join(c.changed) + " changed"
                    if c.changed
                    else "first reading",
                    f"{c.concentration_mcg_per_ml:g} mcg/mL {c.drug or ''}",
                    c.mode,
                    c.serial,
                )
                for i, c in enumerate(report.therapy)
            ],
        )

    _heading(pdf, "Refills")
    if not report.refills:
        _line(pdf, "No refills in this period.")
    else:
        rows = []
        for f in report.refills:
            found = f.discrepancy
            flag = ""
            if found is not None:
                flag = f"{found.delta_ml:+.2f} mL: "
                if found.classification != "none":
                    flag = (
                        f"! {found.classification.replace('_', ' ')} {found.delta_ml:+.2f} mL "
                        f"(limit {found.limit_ml:g} mL): "
                    )
            rows.append(
                (
                    local(f.recorded_at, tz),
                    f"{f.drug} {f.concentration_mcg_per_ml:g} mcg/mL",
                    f"{f.added_ml:g} mL",
                    "-" if found is None else f"{found.expected_residual_ml:g} mL",
                    f"{f.residual_ml:g} mL",
                    flag + report.verdict(f),
                )
            )
        _table(
            pdf,
            ("Date", "Drug", "Added", "Expected left", "Found left", "Discrepancy"),
            (28, 30, 16, 20, 18, 68),
            rows,
        )

    _heading(pdf, "Alerts")
    if not report.alerts:
        _line(pdf, "No alerts in this period.")
    else:
        _table(
            pdf,
            ("Priority", "Alert", "Opened", "Now", "History"),
            (16, 44, 28, 34, 58),
            [
                (
                    e.alert.priority,
                    f"{e.alert.title} ({e.alert.serial})",
                    local(e.alert.opened_at, tz),
                    e.alert.status
                    + (f" {local(e.alert.resolved_at, tz)}" if e.alert.resolved_at else "")
                    + (f": {e.alert.resolution}" if e.alert.resolution else ""),
                    "\n".join(f"{local(h.at, tz)} {h.action} by {who(h.actor)}" for h in e.history)
                    or "-",
                )
                for e in report.alerts
            ],
        )
    return bytes(pdf.output())


def _line(pdf: FPDF, text: str, height: float = 5) -> None:
    pdf.multi_cell(0, height, _text(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _heading(pdf: FPDF, text: str) -> None:
    pdf.ln(3)
    pdf.set_font("Helvetica", "B", 12)
    pdf.set_text_color(20, 50, 79)
    _line(pdf, text, 7)
    pdf.set_text_color(27, 31, 36)
    pdf.set_font("Helvetica", size=10)


def _chart(pdf: FPDF, svg: str) -> None:
    """The page's SVG dose chart, drawn by fpdf2's SVG reader."""
    width = pdf.epw
    if pdf.will_page_break(width * 260 / 760 + 4):
        pdf.add_page()
    # Its title and description are for screen readers; fpdf2's SVG reader skips them noisily.
    drawing = re.sub(r"<(title|desc)\b[^>]*>.*?</\1>", "", svg, flags=re.DOTALL)
    pdf.image(io.BytesIO(drawing.encode()), w=width)
    pdf.ln(2)


def _table(
    pdf: FPDF, header: tuple[str, ...], widths: tuple[int, ...], rows: list[tuple[Any, ...]]
) -> None:
    pdf.set_font("Helvetica", size=8)
    with pdf.table(
        col_widths=widths,
        text_align="LEFT",
        line_height=4,
        first_row_as_headings=True,
    ) as table:
        head = table.row()
        for cell in header:
            head.cell(_text(cell))
        for values in rows:
            row = table.row()
            for value in values:
                row.cell(_text(value))
    pdf.set_font("Helvetica", size=10)
