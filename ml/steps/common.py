"""What every step shares: the instrument of a ticker, errors as text, the all-failed rule."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.universe import Instrument, load_universe

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """Every ticker a batch step tried failed (the task should be retried)."""


def instrument_for(ticker: str, settings: Settings) -> Instrument:
    return load_universe(settings.universe_file).get(ticker)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def raise_if_all_failed(step: str, tried: int, failed: Mapping[str, str], strict: bool) -> None:
    if strict and tried and len(failed) == tried:
        sample = "; ".join(f"{t}: {e}" for t, e in list(failed.items())[:3])
        raise StepFailed(f"{step}: all {tried} ticker(s) failed ({sample})")


def settings_with_overrides(
    settings: Settings, *, kinds: list[str] | None = None, max_epochs: int | None = None
) -> Settings:
    changes: dict[str, Any] = {}
    if kinds:
        from ml.config import _parse_kinds

        changes["kinds"] = _parse_kinds(",".join(kinds))
    if max_epochs:
        changes["max_epochs"] = int(max_epochs)
    return replace(settings, model=replace(settings.model, **changes)) if changes else settings
