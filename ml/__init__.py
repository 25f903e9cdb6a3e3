"""Daily price forecasting, free of Airflow: the DAG (`dags/price_forecast.py`) and the command
line (`python -m ml`) call the same steps. The folders follow the data flow:

    data/       schema, sources (yahoo, files, synthetic), the price store, ingestion
    quality/    the Great Expectations suites and the validation that publishes or quarantines
    model/      features, windows, networks, training, evaluation, the forecaster
    registry/   MLflow: the run, the version, the gate, promotion, the per-ticker lock
    forecasts/  the ledger of every forecast, its monitoring, the CSV export
    steps/      one day's steps over the universe (ingest, validate, train, promote, forecast,
                report), each returning the small dicts the DAG passes through XCom

plus `config` (every setting, from the environment), `universe` (tickers and their slugs), `cli`,
`faults` (the fault suite's kill points), `charts` (the dashboard's SVG) and `servers` (starting
an MLflow server). docs/architecture.md walks through the flow and its contracts.
"""
