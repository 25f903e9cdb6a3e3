"""MLflow: one run per (ticker, logical date), one registered model per ticker, alias promotion.

Everything goes through the tracking server URI (`MLFLOW_TRACKING_URI`); no task opens the MLflow
database. The newest candidate holds the `challenger` alias; `champion` moves only through
`promotion.promote_if_better`, serialized per ticker by `lock`, after the gate (`gate`, a pure
function of the metrics; docs/evaluation.md, "The gate").

- `client`: the client, the experiment, aliases and version searches;
- `tracking`: a candidate's run (params, metrics, plot, pyfunc model) and its registration;
- `versions`: what a ticker's versions say (trained on these bars? the champion as of a date?);
- `gate`: the promotion rule on metrics, no MLflow calls;
- `promotion`: the gate applied in the registry, the aliases moved;
- `lock`: the per-ticker lock the registry's database provides;
- `pyfunc`: the MLflow pyfunc face of a forecaster.
"""
