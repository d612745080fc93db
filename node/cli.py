"""`dcml-node`: run the node daemon (`dcml-node run --config configs/node.toml`) and inspect its config."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dcml node daemon")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (env DCML_NODE__* overrides)")]


@app.command()
def run(config: ConfigOption = None) -> None:
    """Serve the OpenAI-compatible API until SIGINT/SIGTERM, then drain in-flight streams and stop."""
    import uvicorn

    from dcml.node.api.app import create_app
    from dcml.node.api.server import uvicorn_config
    from dcml.node.config import ConfigError, load_settings
    from dcml.node.logging import configure_logging
    from dcml.node.tee.base import TeeError

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    configure_logging(settings.logging.level, settings.logging.format)
    # uvicorn re-raises a captured SIGTERM after its clean shutdown, which ends the process before atexit: write
    # out the queued log records first (logging is asynchronous, node.logging).
    signal.signal(signal.SIGTERM, _flush_logs_then_die)
    _raise_fd_limit()
    try:
        api = create_app(settings, freeze_heap=True)
    except TeeError as exc:  # e.g. [tee.gpu] on a machine without GPU CC mode: say so, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    server = uvicorn.Server(uvicorn_config(api, host=settings.server.host, port=settings.server.port,
                                           graceful_shutdown_s=settings.server.graceful_shutdown_s,
                                           limits=settings.server))
    server.run()  # installs SIGINT/SIGTERM handlers: stop accepting, drain, then lifespan shutdown
    if not server.started:
        raise typer.Exit(1)


@app.command()
def status(
    url: Annotated[str | None, typer.Option(help="The node's base URL; default: from --config [server]")] = None,
    token: Annotated[str | None, typer.Option(envvar="DCML_NODE__STATUS__TOKEN", show_envvar=True,
                                              help="The operator token ([status] token)")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw snapshot")] = False,
) -> None:
    """What the operator status page shows (/status), in the terminal."""
    import json

    import httpx

    from dcml.node.status import print_status

    if url is None or token is None:
        from dcml.node.config import load_settings

        settings = load_settings(config)
        host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
        url = url or f"http://{host}:{settings.server.port}"
        token = token or (settings.status.token.get_secret_value() if settings.status.token else None)
    if not token:
        typer.echo("error: no operator token: pass --token or set DCML_NODE__STATUS__TOKEN", err=True)
        raise typer.Exit(2)
    try:
        r = httpx.get(f"{url.rstrip('/')}/status/data", headers={"authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    if r.status_code != 200:
        typer.echo(f"error: {url} answered {r.status_code}: {r.text[:300]}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(r.json(), indent=2))
    else:
        print_status(r.json())


@app.command("fetch-rims")
def fetch_rims(
    config: ConfigOption = None,
    service: Annotated[str, typer.Option(help="NVIDIA RIM service base URL")] = "https://rim.attestation.nvidia.com",
) -> None:
    """Fetch the driver and VBIOS RIMs this machine's GPUs need into [tee.gpu] rim_dir (run ahead of time)."""
    import os

    from dcml.node.config import load_settings
    from dcml.node.tee.base import TeeError
    from dcml.node.tee.gpu import NvmlCollector
    from dcml.node.tee.gpu import fetch_rims as fetch

    settings = load_settings(config)
    try:
        saved = fetch(NvmlCollector(settings.tee.gpu.devices).collect(os.urandom(32)), settings.tee.gpu.rim_dir,
                      service=service)
    except TeeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{len(saved)} RIM(s) saved to {settings.tee.gpu.rim_dir}")


def _raise_fd_limit() -> None:
    """Connections are bounded by [server] max_concurrency and the per-source cap, not by running out of file
    descriptors (a default soft limit of 1,024 is below max_concurrency)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _flush_logs_then_die(sig: int, _frame: object) -> None:
    from dcml.node.logging import flush_logging

    flush_logging()
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)


@app.command("show-config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + environment) as JSON."""
    from dcml.node.config import load_settings

    typer.echo(load_settings(config).model_dump_json(indent=2))


@app.command("compose-hash")
def compose_hash(files: Annotated[list[Path], typer.Argument(help="dstack app-compose.json file(s)", exists=True,
                                                             dir_okay=False)]) -> None:
    """Print the hash a dstack CVM measures for an app compose, and the mr_config_id it carries (0x01 || hash)."""
    from dcml.node.tee.compose import describe

    for path in files:
        d = describe(path)
        typer.echo(f"{d['compose_hash']}  mr_config_id={d['mr_config_id']}  {path}")


if __name__ == "__main__":
    app()
