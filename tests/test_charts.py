"""ml.charts: the SVG markup the dashboard and each MLflow run's test-block plot are made of."""

from __future__ import annotations

from xml.etree import ElementTree

from ml.charts import line_chart, stacked

SVG = "{http://www.w3.org/2000/svg}"
DATES = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]


def test_a_line_chart_without_reference_labels_its_range_and_skips_gaps() -> None:
    svg = line_chart(
        DATES,
        {"actual": [10.0, 12.0, None, 11.0], "<model>": [10.5, 11.5, 11.0, float("nan")]},
        "High & Low",
        ref=None,
    )
    root = ElementTree.fromstring(svg)
    assert root.get("aria-label") == "High & Low"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"12", "10", "High & Low", "<model>", DATES[0], DATES[-1]} <= set(texts)
    lines = root.findall(f"{SVG}polyline")
    assert [len(line.get("points").split()) for line in lines] == [3, 3]  # None and NaN skipped
    assert root.find(f"{SVG}line") is None  # no dashed reference line


def test_a_line_chart_with_a_reference_draws_it_and_keeps_it_in_range() -> None:
    root = ElementTree.fromstring(line_chart(DATES, {"u2": [0.5, 0.6, 0.7, 0.8]}, "live U2"))
    ref = root.find(f"{SVG}line")
    assert ref is not None and ref.get("stroke-dasharray") == "4 4"
    ys = [float(p.split(",")[1]) for p in root.find(f"{SVG}polyline").get("points").split()]
    assert min(ys) > float(ref.get("y1"))  # every value below 1.0 is drawn below the line


def test_nothing_to_draw_gives_no_chart() -> None:
    assert line_chart([], {"a": []}, "t") == ""
    assert line_chart(DATES, {"a": [None, float("nan"), None, None]}, "t", ref=None) == ""


def test_stacked_charts_are_one_standalone_document_one_below_the_other() -> None:
    charts = [line_chart(DATES, {"a": [1.0, 2.0, 3.0, 4.0]}, name, ref=None) for name in "XY"]
    document = stacked([charts[0], "", charts[1]], "ticker: test block")
    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ElementTree.fromstring(document.split("\n", 1)[1])
    assert root.findtext(f"{SVG}title") == "ticker: test block"
    nested = root.findall(f"{SVG}svg")
    assert [c.get("aria-label") for c in nested] == ["X", "Y"]  # the empty chart is left out
    first, second = (float(c.get("y")) for c in nested)
    assert second == first + float(nested[0].get("height"))
    assert float(root.get("height")) == second + float(nested[1].get("height"))
