"""The original notebook's training loop, in one process: the baseline the pipeline replaces.

    python bench/notebook_baseline.py MANIFEST.json OUT.json [--epochs 3] [--batch-size 32]

For each ticker of the manifest (histories written by `benchlib.write_histories`), as the notebook
did it:
- 8 inputs per bar as standardized price LEVELS: Open, High, Low, Close, Adj Close, Volume, a time
  encoding (days since the first bar) and the return (Close pct change);
- targets: the next bar's High, Low, Close, Adj Close, standardized;
- windows of 6 bars, split chronologically 70/20/10, StandardScaler fitted on the rows of the
  training windows only;
- `Sequential([LSTM(64), Dense(8, relu), Dense(4)])`, Adam 1e-3, MSE, 3 epochs, batch 32.

Records the wall time (imports, data, per-ticker fits) and the validation loss per ticker, plus,
to compare with the pipeline in the same units, Theil's U2 in PRICE units (RMSE relative to
persistence) on the validation and test blocks, with the scaler inverted.
"""

from __future__ import annotations

import argparse
import os
import time

T0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchlib import persistence, read_manifest, theil_u2, u2_dict, write_side_report  # noqa: E402

INPUTS = ["Open", "High", "Low", "Close", "Adj Close", "Volume", "Time", "Return"]
OUTPUTS = ["High", "Low", "Close", "Adj Close"]
WINDOW = 6


def windows_of(history, window: int = WINDOW):
    """(x, y, last_close, last_adj_close) arrays; window i = rows i..i+w-1, target = row i+w."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    df = history.copy()
    df["Time"] = (df["Date"] - df["Date"].iloc[0]).dt.days.astype("float64")
    df["Return"] = df["Close"].pct_change().fillna(0.0)
    feats = df[INPUTS].to_numpy(dtype="float64")
    targets = df[OUTPUTS].to_numpy(dtype="float64")
    n = len(df) - window
    x = sliding_window_view(feats[:-1], window, axis=0).transpose(0, 2, 1)[:n]
    y = targets[window:]
    last = df.iloc[window - 1 : window - 1 + n]
    return (
        np.ascontiguousarray(x),
        y,
        last["Close"].to_numpy(dtype="float64"),
        last["Adj Close"].to_numpy(dtype="float64"),
        feats,
    )


def run_ticker(ticker: str, history, epochs: int, batch_size: int) -> dict:
    import keras
    import numpy as np
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    x, y, last_close, last_adj, feats = windows_of(history)
    n = len(y)
    n_train, n_val = int(n * 0.7), int(n * 0.2)
    x_scaler = StandardScaler().fit(feats[: n_train + WINDOW - 1])
    y_scaler = StandardScaler().fit(y[:n_train])
    xs = x_scaler.transform(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    ys = y_scaler.transform(y)
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n)
    prepared = time.perf_counter()

    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [
            keras.Input(shape=(WINDOW, len(INPUTS))),
            keras.layers.LSTM(64),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(len(OUTPUTS)),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    fit_started = time.perf_counter()
    history_ = model.fit(
        xs[tr],
        ys[tr],
        validation_data=(xs[va], ys[va]),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
    )
    fit_seconds = time.perf_counter() - fit_started

    # Prices: invert the target scaler; score against persistence (last Close) like the pipeline.
    def u2(part: slice) -> dict[str, float]:
        pred = y_scaler.inverse_transform(
            np.asarray(model.predict(xs[part], verbose=0, batch_size=1024))
        )
        return u2_dict(theil_u2(y[part], pred, persistence(last_close[part], last_adj[part])))

    score_started = time.perf_counter()  # the bench's own scoring: timed apart and excluded
    val_u2, test_u2 = u2(va), u2(te)
    score_seconds = time.perf_counter() - score_started
    val_loss = [float(v) for v in history_.history["val_loss"]]
    return {
        "ticker": ticker,
        "bars": len(history),
        "windows": {"train": n_train, "val": n_val, "test": n - n_train - n_val},
        "prepare_seconds": round(prepared - started, 4),
        "fit_seconds": round(fit_seconds, 4),
        "seconds": round(time.perf_counter() - started - score_seconds, 4),
        "score_seconds": round(score_seconds, 4),
        "val_loss": val_loss[-1],
        "best_val_loss": min(val_loss),
        "val_u2": val_u2,
        "test_u2": test_u2,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import_started = time.perf_counter()
    import keras  # noqa: F401  (the notebook's imports, timed)
    import pandas as pd
    import sklearn.preprocessing  # noqa: F401
    import tensorflow  # noqa: F401

    import_seconds = time.perf_counter() - import_started

    manifest = read_manifest(args.manifest)
    rows = []
    for entry in manifest["tickers"]:
        history = pd.read_parquet(entry["path"])
        rows.append(run_ticker(entry["ticker"], history, args.epochs, args.batch_size))
        print(
            f"notebook {entry['ticker']:<10} fit {rows[-1]['fit_seconds']:6.2f}s  "
            f"val_loss {rows[-1]['val_loss']:.5f}",
            flush=True,
        )
    write_side_report(
        args.out,
        started=T0,
        import_seconds=import_seconds,
        rows=rows,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
