"""Prices in: the bar schema, the sources (Yahoo, files, synthetic), the store (published history,
staging, quarantine; atomic writes) and ingestion (fetch -> stage -> validate -> publish)."""
