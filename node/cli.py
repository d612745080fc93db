"""`dcml-node`: run the node daemon (`dcml-node run --config configs/node.toml`) and inspect its config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dcml node daemon")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (env DCML_NODE__* overrides)")]


@app.command()
def run(config: ConfigOption = None) -> None:
    """Serve the OpenAI-compatible API until SIGINT/SIGTERM, then drain in-flight streams and stop."""
    import uvicorn

    from node.api.app import create_app
    from node.api.server import uvicorn_config
    from node.config import ConfigError, load_settings
    from node.logging import configure_logging

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    configure_logging(settings.logging.level, settings.logging.format)
    api = create_app(settings)
    server = uvicorn.Server(uvicorn_config(api, host=settings.server.host, port=settings.server.port,
                                           graceful_shutdown_s=settings.server.graceful_shutdown_s))
    server.run()  # installs SIGINT/SIGTERM handlers: stop accepting, drain, then lifespan shutdown
    if not server.started:
        raise typer.Exit(1)


@app.command("show-config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + environment) as JSON."""
    from node.config import load_settings

    typer.echo(load_settings(config).model_dump_json(indent=2))


@app.command("compose-hash")
def compose_hash(files: Annotated[list[Path], typer.Argument(help="dstack app-compose.json file(s)", exists=True,
                                                             dir_okay=False)]) -> None:
    """Print the hash a dstack CVM measures for an app compose, and the mr_config_id it carries (0x01 || hash)."""
    from node.tee.compose import describe

    for path in files:
        d = describe(path)
        typer.echo(f"{d['compose_hash']}  mr_config_id={d['mr_config_id']}  {path}")


if __name__ == "__main__":
    app()
