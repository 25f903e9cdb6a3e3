"""The steps of one daily run, as plain functions returning small dicts (what XCom carries).

The DAG's tasks and the command line (`python -m ml run`) call the same functions, in this order:

    data.ingest_all -> data.validate_all -> model.train_step (one per ticker that needs it)
    -> model.promote_all -> forecast.forecast_all -> report.summarize_tickers

The data phase handles every ticker in one call: the downloads run concurrently (at most
`FETCH_CONCURRENCY` at once), validation and publishing one ticker after another. Training is the
one expensive per-ticker step. Promotion walks the new candidates one by one in one process, so
no two tasks of a run race on an alias; forecasting loads each champion once and writes every
forecast in one write. Every batch step returns its per-ticker results and a `failed` map
(ticker -> error); one ticker's failure never stops the others. A batch step raises only when
every ticker it tried failed and `strict` (the DAG's tasks): that smells of an outage (Yahoo,
MLflow), which a task retry may cure. The contracts the steps keep: docs/architecture.md.
"""
