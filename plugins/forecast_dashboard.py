"""The forecast dashboard's Airflow plugin: Browse -> Forecasts, and its app under /forecast-dashboard.

The dashboard itself is the package `forecast_dashboard_app/` next to this file (data, views,
Jinja2 templates; what it shows and how it is protected: its `__init__.py`). This file only
registers it, and is the dashboard's one module that Airflow's plugins manager imports:

- The manager (3.3.2: `airflow/_shared/plugins_manager/plugins_manager.py`,
  `_load_plugins_from_plugin_directory`) walks the plugins folder recursively and executes every
  `.py` file it finds by path, as a top-level module named after the file's stem, registering each
  AirflowPlugin subclass found in it. A package's files would be run that way too: its
  `__init__.py` as a module named `__init__` (relative imports fail), its submodules a second time
  under bare names (`views`, `data`). `.airflowignore` in this folder therefore hides
  `forecast_dashboard_app/` from that walk, and the plugin class lives here only: registered once.
- The package is imported by its name: Airflow puts the plugins folder on sys.path when it starts
  (`airflow.settings.prepare_syspath_for_config_and_plugins`), before it loads any plugin, as for
  `airflow_sqlite.py` and `preloading_executor.py`.

Import cost: only the standard library, `airflow.plugins_manager` and the package, which imports
nothing heavy until the app is asked for.
"""

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from forecast_dashboard_app import URL_PREFIX, get_app


class ForecastDashboardPlugin(AirflowPlugin):
    """Browse -> Forecasts in the Airflow UI, served by the api-server under /forecast-dashboard."""

    name = "forecast_dashboard"
    external_views = [  # noqa: RUF012 - the AirflowPlugin interface is class-level lists
        {
            "name": "Forecasts",
            # Relative to the UI's <base href>, so it also works when Airflow is served under a
            # sub-path ([api] base_url).
            "href": "forecast-dashboard/",
            "destination": "nav",
            "category": "browse",
            "url_route": "forecasts",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # A property, so processes that load plugins only for macros or listeners (every task)
        # never build the app nor import FastAPI.
        return [{"app": get_app(), "url_prefix": URL_PREFIX, "name": "Forecast dashboard"}]
