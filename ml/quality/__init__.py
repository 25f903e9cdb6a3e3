"""Data quality: the Great Expectations suites per asset class (`suite`) and the validation that
decides whether a batch is published or quarantined, with its report (`validation`)."""
