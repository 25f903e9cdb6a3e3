"""The work of each stage of a day (`ml.pipeline` declares the stages and their order).

    data.ingest_all -> data.publish_all -> data.registered_versions -> data.plan_training
    -> model.train_step (one per ticker that needs it) -> model.promote_candidates
    -> forecast.forecast_all -> report.summarize_day

What the stages hand each other is in `records` (frozen dataclasses with a plain form for XCom).
The data phase handles every ticker in one call: the downloads run concurrently (at most
`FETCH_CONCURRENCY` at once), validation and publishing spread over the cores. Training is the
one expensive per-ticker step. Promotion walks the new candidates one by one in one process, so
no two tasks of a run race on an alias; forecasting loads each champion once and writes every
forecast in one write. Every batch step returns its per-ticker results and a `failed` map
(ticker -> error); one ticker's failure never stops the others. A batch step raises only when
every ticker it tried failed and `strict` (the DAG's tasks): that smells of an outage (Yahoo,
MLflow), which a task retry may cure. `validate_all` and `promote_all` are the data phase and
promotion in the dict form the command line's single steps and the tests use. The contracts
the steps keep: docs/architecture.md.
"""
