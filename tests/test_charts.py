"""ml.charts: the SVG markup the dashboard and each MLflow run's test-block plot are made of."""

from __future__ import annotations

from xml.etree import ElementTree

from ml.charts import CloseInterval, line_chart, price_band_chart, stacked

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


def test_a_price_chart_draws_close_intervals_and_marks_closes_by_shape() -> None:
    bars = [
        {"Date": d, "High": c + 1, "Low": c - 1, "Close": c}
        for d, c in zip(DATES, [100.0, 104.0, 91.0, 100.0], strict=True)
    ]
    intervals = {
        DATES[1]: CloseInterval(95, 97, 103, 105),  # 104: inside the 90 %
        DATES[2]: CloseInterval(92, 95, 105, 108),  # 91: outside
    }
    svg = price_band_chart(
        bars, {}, (99, 101), "T & co", intervals, CloseInterval(80, 90, 110, 120), "held 1 of 2"
    )
    root = ElementTree.fromstring(svg)
    assert root.findtext(f"{SVG}desc") == "held 1 of 2"
    classes = [e.get("class") for e in root.iter() if e.get("class")]
    assert classes.count("interval90") == classes.count("interval80") == 2
    assert classes.count("next-interval90") == 1
    # inside: a circle, outside: a cross (a path), each with its reason as a tooltip
    (inside,) = [e for e in root.iter(f"{SVG}circle") if e.get("class") == "close-inside"]
    (outside,) = [e for e in root.iter(f"{SVG}path") if e.get("class") == "close-outside"]
    assert "inside the 90 % interval 95..105" in inside.findtext(f"{SVG}title")
    assert "Close 91 outside" in outside.findtext(f"{SVG}title")
    legend = " ".join(t.text or "" for t in root.find(f"{SVG}g").iter(f"{SVG}text"))
    assert "Close inside 90 %" in legend and "Close outside 90 %" in legend
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "120" in texts and "80" in texts  # the next bar's 90 % interval sets the axis


def test_a_price_chart_without_intervals_has_no_interval_layer() -> None:
    bars = [{"Date": DATES[0], "High": 2.0, "Low": 1.0, "Close": 1.5}]
    svg = price_band_chart(bars, {DATES[0]: (1.2, 1.8)}, None, "t")
    assert "interval" not in svg and "legend" not in svg and "<desc>" not in svg
    assert ElementTree.fromstring(svg).find(f"{SVG}rect[@class='band']") is not None
