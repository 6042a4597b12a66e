"""``chaoqing ray``: chaoqing's models as Ray Serve applications (``pip install 'chaoqing[ray]'``).

- ``chaoqing ray deploy --config FILE`` starts Ray in this process (or joins a cluster: ``[ray]
  address``), runs one application per model and ``/v2``, prints the URL for the gateways'
  ``[endpoints]``, and serves until Ctrl-C or SIGTERM, when Serve and Ray shut down;
- ``chaoqing ray config --config FILE`` prints the same applications as Serve's own config file,
  for ``serve run FILE`` / ``serve deploy FILE`` on a running cluster.

This command runs without gevent's monkey-patching (:func:`chaoqing.cli.main` leaves it out):
Ray's driver runs threads, subprocesses and gRPC of its own. docs/scale-out.md explains the set-up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from chaoqing.modelserver.ray_serve import RayServeConfig

__all__ = ["ray"]

_log = logging.getLogger("chaoqing.ray")

# Ray reports usage to its developers unless told not to; chaoqing does not opt its users in
USAGE_STATS_VARIABLE = "RAY_USAGE_STATS_ENABLED"
CONFIG_OPTION = click.option(
    "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="chaoqing's Ray TOML file: [ray], [http], [defaults], [models.NAME] (docs/scale-out.md).",
)


def _require_ray_serve() -> None:
    """Raises click.ClickException naming the extra when Ray Serve is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise click.ClickException("Ray Serve is not installed: pip install 'chaoqing[ray]'")


def _load(config_path: Path) -> RayServeConfig:
    from chaoqing.errors import ConfigError
    from chaoqing.modelserver.ray_serve import load_ray_config

    try:
        return load_ray_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("ray", short_help="Serve the models on Ray Serve (chaoqing[ray]).")
def ray() -> None:
    """Serve chaoqing's models as Ray Serve deployments behind KServe v2 routes.

    Point gateways at the printed URL: [endpoints] "MODEL" = ["http://HOST:PORT"].
    """


@ray.command("deploy")
@CONFIG_OPTION
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Level of chaoqing's own log lines.")
def deploy(config_path: Path, log_level: str) -> None:
    """Start Ray (or join [ray] address), run the models, serve until Ctrl-C or SIGTERM."""
    from chaoqing.logs import configure_logging

    configure_logging(log_level)
    _require_ray_serve()
    os.environ.setdefault(USAGE_STATS_VARIABLE, "0")
    from chaoqing.modelserver.ray_serve import run_applications, start_ray, stop_applications

    config = _load(config_path)
    stopping = threading.Event()

    def on_signal(number: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            os._exit(1)  # a second signal: out at once
        stopping.set()

    def handle_signals() -> None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    handle_signals()
    started = time.monotonic()
    try:
        start_ray(config)
        handle_signals()  # over the handlers ray.init installs, which abort the process at exit
        if not stopping.is_set():
            run_applications(config)
        if not stopping.is_set():
            models = ", ".join(model.name for model in config.models)
            _log.info("ray serve ready in %.1f s: %s at %s", time.monotonic() - started, models, config.url)
            click.echo(f"serving {models} at {config.url} (Ctrl-C stops)", err=True)
            stopping.wait()
    except (RuntimeError, ConnectionError, ValueError) as exc:
        raise click.ClickException(f"Ray Serve could not start the models: {exc}") from None
    finally:
        stop_applications()
        _log.info("stopped")


@ray.command("config")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML (Serve reads either).")
def serve_config_command(config_path: Path, as_json: bool) -> None:
    """Print Serve's config file for `serve run` / `serve deploy` from chaoqing's TOML."""
    from chaoqing.modelserver.ray_serve import serve_config

    config = _load(config_path)
    document = serve_config(config)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    _require_ray_serve()  # PyYAML comes with it
    import yaml

    click.echo(yaml.safe_dump(document, sort_keys=False), nl=False)
