"""The gateway as a WSGI app for gunicorn: ``gunicorn -k gevent -w 2 'chaoqing.wsgi:app'``.

gunicorn's gevent worker monkey-patches each worker before loading this module. The
configuration comes from ``CHAOQING_CONFIG`` (a TOML path) and ``CHAOQING_*`` variables, and
must name model endpoints (``[endpoints]``): workers do not start model servers, so run
``chaoqing model-server`` processes (or Triton/KServe) beside them. Each worker gets its own
remote client (with health checks) and its own metrics.
"""

from __future__ import annotations

import os

from chaoqing.config import load_config
from chaoqing.errors import ConfigError
from chaoqing.gateway.app import Gateway
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.pipeline import quiet_expected_errors
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import start_hub_watch

__all__ = ["app", "build_app"]


def build_app() -> object:
    """Build the app from the environment. Raises ConfigError when no endpoints are configured."""
    config = load_config(os.environ.get("CHAOQING_CONFIG"))
    missing = [name for name in config.models_needed() if name not in config.endpoints]
    if missing:
        raise ConfigError(
            f"under gunicorn every model needs an endpoint; missing: {', '.join(missing)} "
            "(set [endpoints] in CHAOQING_CONFIG or CHAOQING_ENDPOINTS__<MODEL>=URL)"
        )
    metrics = GatewayMetrics()
    start_hub_watch(metrics)  # each gunicorn worker watches its own hub (chaoqing_hub_blocked_* metrics)
    quiet_expected_errors()
    remotes = RemoteModels.from_config(config, metrics)
    remotes.start_health_checks()
    gateway = Gateway(config, remotes, metrics)
    gateway.jobs.start()  # each worker runs jobs from the shared spool; a killed worker's are taken over
    return gateway.app


app = build_app()
