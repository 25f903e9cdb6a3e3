"""The pipeline's training code on the notebook's work, in one process, without MLflow.

    python bench/ours_training.py MANIFEST.json OUT.json [--epochs 3] [--batch-size 32]
        [--kinds lstm] [--patience 3]

For each ticker of the manifest, `ml.model.training.train_on_history` with the notebook's model config
(LSTM(64) -> Dense(8, relu) -> Dense(4), Adam 1e-3, MSE, window 6, 70/20/10) and `--epochs`
epochs; patience >= epochs, so early stopping never ends a fit early (the best epoch's weights are
still restored, as the pipeline does). Everything train_on_history does is timed: windowing,
scaling, the fit, the skill weights on validation, the test predictions and the evaluation.

Records the validation loss (standardized log-ratios: NOT the notebook's units) and, comparable
with the notebook, Theil's U2 in PRICE units against persistence on the validation and test blocks:
the raw network (skill weights 1) and the shipped forecaster (skill weights fitted on validation,
so its validation U2 is in-sample for those weights; its test U2 is not).
"""

from __future__ import annotations

import argparse
import os
import time

T0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchlib import AS_OF, persistence, read_manifest, theil_u2, u2_dict, write_side_report  # noqa: E402


def _u2(part, raw_log_ratios, weights) -> dict[str, float]:
    """Theil's U2 in price units against persistence, the log-ratios scaled by `weights`."""
    import numpy as np

    anchors = np.stack([part.last_close, part.last_close, part.last_close, part.last_adj_close], 1)
    pred = anchors * np.exp(raw_log_ratios * np.asarray(weights))
    return u2_dict(theil_u2(part.actual, pred, persistence(part.last_close, part.last_adj_close)))


def score(result) -> dict[str, dict[str, float]]:
    """The bench's own scoring (not part of the training work): the raw network (skill weights 1)
    and the shipped forecaster, on the validation and test blocks."""
    split, forecaster = result.split, result.forecaster
    raw_val = forecaster.raw_log_ratios(split.val.x)
    raw_test = forecaster.raw_log_ratios(split.test.x)
    raw, shipped = (1.0, 1.0, 1.0, 1.0), forecaster.skill_weights
    return {
        "val_u2_raw": _u2(split.val, raw_val, raw),
        "val_u2": _u2(split.val, raw_val, shipped),
        "test_u2_raw": _u2(split.test, raw_test, raw),
        "test_u2": _u2(split.test, raw_test, shipped),
    }


def row(ticker: str, history, result, seconds: float) -> dict:
    split, chosen = result.split, result.chosen
    score_started = time.perf_counter()  # timed apart and excluded from the wall time
    scores = score(result)
    return {
        "ticker": ticker,
        "bars": len(history),
        "windows": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "fit_seconds": round(sum(c.seconds for c in result.candidates), 4),
        "seconds": round(seconds, 4),
        "epochs_run": chosen.epochs_run,
        "best_epoch": chosen.best_epoch,
        "val_loss": chosen.val_loss[-1],
        "best_val_loss": chosen.best_val_loss,
        "skill_weights": list(result.forecaster.skill_weights),
        **scores,
        "score_seconds": round(time.perf_counter() - score_started, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kinds", default="lstm")
    parser.add_argument("--patience", type=int, default=None, help="default: max(3, epochs)")
    args = parser.parse_args()

    import_started = time.perf_counter()
    import numpy  # noqa: F401
    import pandas as pd

    from ml.config import ModelConfig
    from ml.model.networks import configure_tensorflow
    from ml.model.training import train_on_history

    configure_tensorflow()  # imports TensorFlow (train_on_history would do it on the first call)
    import keras  # noqa: F401

    import_seconds = time.perf_counter() - import_started

    config = ModelConfig(
        kinds=tuple(args.kinds.split(",")),
        units=64,
        dense_units=8,
        learning_rate=1e-3,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience or max(3, args.epochs),
        window=6,
        split=(0.7, 0.2, 0.1),
    )
    rows = []
    for entry in read_manifest(args.manifest)["tickers"]:
        history = pd.read_parquet(entry["path"])
        started = time.perf_counter()
        result = train_on_history(entry["ticker"], AS_OF, history, config)
        seconds = time.perf_counter() - started
        rows.append(row(entry["ticker"], history, result, seconds))
        print(
            f"ours     {entry['ticker']:<10} fit {rows[-1]['fit_seconds']:6.2f}s  "
            f"total {seconds:6.2f}s  best val_loss {result.chosen.best_val_loss:.5f}",
            flush=True,
        )
    write_side_report(
        args.out,
        started=T0,
        import_seconds=import_seconds,
        rows=rows,
        epochs=args.epochs,
        batch_size=args.batch_size,
        kinds=list(config.kinds),
        patience=config.patience,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
