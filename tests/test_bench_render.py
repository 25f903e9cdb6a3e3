"""BENCHMARKS.md is rendered from a run's results.json by `bench/render.py` (the figures) and
`bench/templates/BENCHMARKS.md.j2` (the prose). The fixture is a real small run (imports, (1),
(2), profile) completed by hand with (3), (6) and (5) (see tests/fixtures/bench/README.md); the
golden file is what the renderer wrote for it before the prose moved into the template (plus the
"Latest run" heading), without the hand-written parts; every real rendering includes those
(bench/probabilistic.md, bench/notes.md, bench/history.md)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "bench"
sys.path.insert(0, str(REPO / "bench"))

import render  # noqa: E402

# The hand-written parts left out: the figures alone, as in the golden file.
BARE = {"notes": None, "top": None, "history": None}
SECTIONS = (
    "## Summary",
    "## (1) and (2): the notebook's training loop and ours, same data, same model",
    "## (3) The whole daily run",
    "## (6) Incremental days after the first run",
    "## (5) Growth: the whole daily run for larger universes",
    "## Where the time goes: imports in a fresh process",
    "## Where the time goes: one ticker's steps (SPY), each in a fresh process",
    "## Closing note: where the time goes",
)


@pytest.fixture
def results() -> dict[str, Any]:
    return json.loads((FIXTURES / "results.json").read_text())


def expected() -> str:
    return (FIXTURES / "BENCHMARKS.expected.md").read_text()


def without(results: dict[str, Any], path: tuple) -> dict[str, Any]:
    """A copy of `results` without the key at `path`."""
    broken = copy.deepcopy(results)
    node = broken
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return broken


def test_the_fixture_renders_to_the_golden_file(results: dict[str, Any]) -> None:
    assert render.render(results, **BARE) == expected()


def test_the_fixture_has_every_part_the_template_reads(results: dict[str, Any]) -> None:
    assert set(results["meta"]["parts"]) == {
        "imports", "notebook", "ours", "daily", "incremental", "growth", "profile"
    }  # fmt: skip
    assert {"notebook", "ours@32", "ours@64"} <= set(results["training"]["sides"])
    labels = [r["label"] for r in results["daily"]["incremental"]]
    assert labels == ["weekend", "next-weekday", "no-new-data"]
    assert results["daily"]["daily"] and len(results["growth"]) >= 2
    assert set(results["profile"]["steps"]) == {"ingest", "publish", "train", "promote", "forecast"}
    assert not results["errors"]
    text = render.render(results, **BARE)
    assert [s for s in SECTIONS if s not in text] == []


@pytest.mark.parametrize(
    "path",
    [
        ("meta", "finished"),
        ("meta", "args", "import_repeat"),
        ("training", "bars"),
        ("training", "sides", "notebook", "result", "epochs"),
        ("daily", "daily", "run_id"),
        ("daily", "daily", "executor_workers"),
        ("daily", "incremental", 2, "gap_seconds"),
        ("growth", 1, "components_wall_seconds"),
        ("profile", "steps", "train", "cprofile_step_seconds"),
        ("profile", "ticker"),
    ],
)
def test_a_figure_missing_from_the_results_fails_the_rendering(
    results: dict[str, Any], path: tuple
) -> None:
    """StrictUndefined: a name the template reads that the results lack is an error, not a
    blank in the report."""
    with pytest.raises(jinja2.UndefinedError):
        render.render(without(results, path))


@pytest.mark.parametrize(
    "path",
    [("daily", "daily", "fetched"), ("growth", 0, "per_ticker_seconds"), ("imports", 0, "min")],
)
def test_a_figure_the_context_computes_from_fails_too(results: dict[str, Any], path: tuple) -> None:
    """The same for the figures `render.py` computes before the template sees them."""
    with pytest.raises(KeyError):
        render.render(without(results, path))


def test_notes_go_verbatim_after_the_run_description(results: dict[str, Any]) -> None:
    notes = (REPO / "bench" / "notes.md").read_text()
    text = render.render(results, notes, top=None, history=None)
    head, rest = expected().split("## Summary", 1)
    assert text == f"{head}{notes.strip()}\n\n## Summary{rest}"


def hand_written() -> dict[str, str]:
    texts = {name: getattr(render, name.upper()).read_text().strip() for name in BARE}
    assert all(texts.values()), "a hand-written part of BENCHMARKS.md is empty"
    return texts


def assert_has_the_hand_written_parts(text: str) -> None:
    """The top after the title, the notes between the run's description and the summary, the
    history at the end, each verbatim."""
    parts = hand_written()
    assert text.startswith(f"# Benchmarks\n\n{parts['top']}\n\n## Latest run (")
    description, rest = text.split("\n## Summary\n", 1)
    assert description.endswith(f"\n\n{parts['notes']}\n")
    assert rest.endswith(f"\n\n{parts['history']}\n")
    assert text.count("\n## History\n") == 1


def test_every_rendering_includes_the_hand_written_parts(results: dict[str, Any]) -> None:
    """No flag needed: bench/probabilistic.md, bench/notes.md and bench/history.md are in every
    report, so `make bench` does not drop what was written by hand."""
    assert_has_the_hand_written_parts(render.render(results))
    with_them = render.render(results, render.NOTES, render.TOP, render.HISTORY)
    assert with_them == render.render(results)


def test_a_full_run_writes_the_hand_written_parts_too(
    results: dict[str, Any], tmp_path: Path
) -> None:
    """What `make bench` does after measuring (no --render-only, no --notes): the same parts,
    and the raw figures named where the run wrote them."""
    import run

    out = tmp_path / "BENCHMARKS.md"
    args = run.parse_args(["--out", str(out)])
    run.write_report(args, results, Path(results["meta"]["json"]))
    text = out.read_text()
    assert_has_the_hand_written_parts(text)
    assert f"raw figures: `{results['meta']['json']}`" in text


def test_a_missing_or_empty_hand_written_file_is_left_out(
    results: dict[str, Any], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.md"
    empty.write_text("\n")
    text = render.render(results, empty, tmp_path / "missing.md", None)
    assert text == expected()


def test_a_quick_run_and_failed_parts_are_flagged(results: dict[str, Any]) -> None:
    results["meta"]["args"]["quick"] = True
    results["errors"] = {"growth": "Traceback (most recent call last):\nRuntimeError: boom"}
    text = render.render(results, **BARE)
    assert text.startswith("# Benchmarks\n\n> **QUICK SMOKE RUN (`--quick`)**: tiny sizes")
    assert "\n**Part `growth` failed:** `RuntimeError: boom`\n\n## Summary\n" in text


def test_a_run_of_some_parts_renders_only_their_sections(results: dict[str, Any]) -> None:
    for part in ("training", "daily", "growth", "profile"):
        del results[part]
    text = render.render(results, **BARE)
    assert [s for s in SECTIONS if s in text] == [
        "## Summary",
        "## Where the time goes: imports in a fresh process",
        "## Closing note: where the time goes",
    ]


def test_render_only_writes_the_report(tmp_path: Path) -> None:
    import run

    out = tmp_path / "BENCHMARKS.md"
    notes = tmp_path / "notes.md"
    notes.write_text("> a note\n")
    argv = ["--render-only", str(FIXTURES / "results.json"), "--out", str(out)]
    assert run.main([*argv, "--notes", str(notes)]) == 0
    results = json.loads((FIXTURES / "results.json").read_text())
    results["meta"]["json"] = "tests/fixtures/bench/results.json"  # the file it was rendered from
    assert out.read_text() == render.render(results, "> a note")
    assert "raw figures: `tests/fixtures/bench/results.json`" in out.read_text()


def test_the_no_new_data_day_is_judged_on_the_median_of_its_runs(results: dict[str, Any]) -> None:
    """`--no-new-data-runs 3`: one summary row, the middle run by wall time, each run's wall
    listed; a train instance in any of the runs fails it."""
    runs = copy.deepcopy(results)
    incr = runs["daily"]["incremental"]
    (single,) = [r for r in incr if r["label"] == "no-new-data"]
    daily_wall = runs["daily"]["daily"]["wall_seconds"]
    walls = (0.10 * daily_wall, 0.02 * daily_wall, 0.04 * daily_wall)  # median: 0.04
    repeats = [{**copy.deepcopy(single), "wall_seconds": round(w, 2)} for w in walls]
    runs["daily"]["incremental"] = [r for r in incr if r["label"] != "no-new-data"] + repeats
    rows = [d for d in render.context(runs)["days"] if d["no_new"]]
    assert len(rows) == 1
    (row,) = rows
    assert row["r"] is runs["daily"]["incremental"][-1]  # the 0.04 run
    assert row["ratio"] == f"{round(walls[2], 2) / daily_wall:.3f} of (3)"
    assert row["runs"] == " / ".join(render.fmt(round(w, 2), 2) for w in walls)
    assert row["verdict"] == render.verdict(True)
    page = render.render(runs)
    assert f"median of 3 runs: {row['runs']} s" in page

    repeats[0]["train_instances"] = 1  # one of the runs trained: no longer a no-new-data day
    (row,) = [d for d in render.context(runs)["days"] if d["no_new"]]
    assert row["n_train"] == 1 and row["verdict"] == render.verdict(False)


def test_cpu_by_component_is_listed_per_run_and_per_ticker(results: dict[str, Any]) -> None:
    """Runs that carry CPU seconds by component get them in (3)'s paragraph and in a growth
    table, per run and per ticker, largest component first; runs without them (older results)
    render as before."""
    results = copy.deepcopy(results)
    results["daily"]["daily"]["cpu_seconds"] = {"scheduler": 3.5, "MLflow server": 12.25}
    for run, scheduler in zip(results["growth"], (4.0, 30.0, 400.0), strict=False):
        run["cpu_seconds"] = {"scheduler": scheduler, "MLflow server": 10.0 * run["tickers"]}
    text = render.render(results)
    assert "the executor's workers): MLflow server 12.2 s, scheduler 3.5 s." in text
    table = text.split("CPU seconds used by each component", 1)[1]
    assert "| run | wall s | MLflow server | scheduler | all |" in table
    first = results["growth"][0]
    n = first["tickers"]
    row = (
        f"| {first['size']} | {fmt(first['wall_seconds'])} | {fmt(10.0 * n)} (10.000) "
        f"| 4.0 ({4.0 / n:.3f}) | {fmt(10.0 * n + 4.0)} ({(10.0 * n + 4.0) / n:.3f}) |"
    )
    assert row in table


def fmt(value: float) -> str:
    return render.fmt(value, 1)
