"""Forecasts out: the ledger (every forecast, scored when its bar arrives; the store of record),
its monitoring (live metrics, input drift, retrain hints) and the CSV export."""
