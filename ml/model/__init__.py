"""The model: the notebook's inputs plus volatility memory (`features`), windows and train-only
scaling (`windows`), the LSTM/GRU networks (`networks`), training and candidate choice
(`training`), honest evaluation against persistence and the range-aware naive (`evaluation`) and
the forecaster that turns bars into the next bar's prices (`forecaster`)."""
