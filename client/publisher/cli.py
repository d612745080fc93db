"""`dcml model ...`: encrypt a Hugging Face model, publish it on-chain, run its key broker, revoke.

    dcml model encrypt models/demo --out bundles/demo --name demo --publisher-key $KEY
    dcml model publish bundles/demo --royalty-bps 250 --price-floor 30000000000000 \
        --broker-url https://keys.example --allow-measurement <hex> --publisher-key $KEY
    dcml model serve-keys bundles/demo --key-file bundles/demo.key --policy configs/policy.toml
    dcml model revoke --db broker.sqlite --node 0x... | --measurement <hex>
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from web3 import Web3
from web3.types import TxReceipt

from dcml.client.chain.connect import connect
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.model_registry import model_id as model_id_of
from dcml.client.chain.tx import send
from dcml.client.publisher.bundle import KEY_LEN, SignedManifest, encrypt_model, generate_key, load_manifest, model_size

model_app = typer.Typer(help="Encrypt, publish and serve the keys of confidential models.", no_args_is_help=True)
console = Console(stderr=True)


def _account(key: str | None) -> LocalAccount:
    key = key or os.environ.get("DCML_PUBLISHER_KEY")
    if not key:
        raise typer.BadParameter("pass --publisher-key or set DCML_PUBLISHER_KEY (the publisher's private key)")
    return Account.from_key(key)


def write_key_file(path: Path, key: bytes) -> None:
    """0600, created exclusively: never overwrite a model key (the bundle would become unopenable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)


def read_key_file(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        raise typer.BadParameter(f"{path} is readable by others: chmod 600 it")
    key = path.read_bytes()
    if len(key) != KEY_LEN:
        raise typer.BadParameter(f"{path} holds {len(key)} bytes, a model key is {KEY_LEN}")
    return key


def publish_model(
    w3: Web3,
    model_registry: str,
    publisher: LocalAccount,
    signed: SignedManifest,
    *,
    royalty_bps: int,
    price_floor: int,
    broker_url: str,
    measurements: list[bytes],
) -> TxReceipt:
    """`ModelRegistry.publish` for a signed bundle manifest."""
    m = signed.manifest
    fn = contract(w3, "ModelRegistry", model_registry).functions.publish(
        m.model_id_bytes,
        royalty_bps,
        signed.manifest_hash,
        bytes.fromhex(m.weights_hash.removeprefix("0x")),
        price_floor,
        broker_url,
        measurements,
    )
    return send(w3, publisher, fn, action="publish model")


@model_app.command()
def encrypt(
    model_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Hugging Face model directory")],
    out: Annotated[Path, typer.Option("--out", help="bundle directory to create (must not exist or be empty)")],
    name: Annotated[
        str | None, typer.Option(help="published model name (model id = keccak256(name)); default: dir name")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="where to write the new model key (default: <out>.key, 0600)")
    ] = None,
    chunk_size: Annotated[int, typer.Option(help="bytes per sealed chunk")] = 1 << 20,
    publisher_key: Annotated[
        str | None, typer.Option(envvar="DCML_PUBLISHER_KEY", help="publisher private key (signs)")
    ] = None,
) -> None:
    """Seal every weight file with AES-256-GCM (STREAM chunks) and write the signed manifest."""
    publisher = _account(publisher_key)
    name = name or model_dir.name
    key_file = key_file or out.with_name(out.name + ".key")
    key = generate_key()
    write_key_file(key_file, key)  # first: a crash later must not lose the key of a half-written bundle
    with Progress(
        *Progress.get_default_columns()[:-1], BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as bar:
        task = bar.add_task("sealing", total=model_size(model_dir))
        signed = encrypt_model(
            model_dir,
            out,
            model_id=model_id_of(name),
            model_name=name,
            publisher=publisher,
            model_key=key,
            chunk_size=chunk_size,
            progress=lambda n: bar.advance(task, n),
        )
    console.print(
        f"bundle {out}\n  model id      {signed.manifest.model_id}\n  manifest hash "
        f"0x{signed.manifest_hash.hex()}\n  weights hash  {signed.manifest.weights_hash}\n"
        f"  key           {key_file} (keep it secret: the broker needs it, nodes never see it)"
    )


@model_app.command()
def publish(
    bundle: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    broker_url: Annotated[str, typer.Option(help="the key broker nodes will attest to")],
    royalty_bps: Annotated[int, typer.Option(min=0, max=10_000)] = 0,
    price_floor: Annotated[int, typer.Option(min=0, help="least price per output token (token's smallest unit)")] = 0,
    allow_measurement: Annotated[
        list[str] | None, typer.Option(help="measurement id (64 hex) allowed to get the key")
    ] = None,
    deployment: Annotated[Path, typer.Option()] = Path(".devnet/deployment.json"),
    publisher_key: Annotated[str | None, typer.Option(envvar="DCML_PUBLISHER_KEY")] = None,
) -> None:
    """Record the bundle in ModelRegistry (hashes, royalty, price floor, broker URL, measurements)."""
    if allow_measurement is None:
        allow_measurement = []
    publisher = _account(publisher_key)
    signed = load_manifest(bundle)
    dep = Deployment.load(deployment)
    w3 = connect(dep.rpc_url)
    receipt = publish_model(
        w3,
        dep.model_registry,
        publisher,
        signed,
        royalty_bps=royalty_bps,
        price_floor=price_floor,
        broker_url=broker_url,
        measurements=[bytes.fromhex(m.removeprefix("0x")) for m in allow_measurement],
    )
    console.print(f"published {signed.manifest.model_id} in tx 0x{bytes(receipt['transactionHash']).hex()}")


@model_app.command("serve-keys")
def serve_keys(
    bundle: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    key_file: Annotated[Path, typer.Option(exists=True, dir_okay=False)],
    policy: Annotated[Path, typer.Option(exists=True, dir_okay=False)] = Path("configs/policy.toml"),
    db: Annotated[Path, typer.Option(help="audit log and revocations")] = Path("key-broker.sqlite"),
    allow_measurement: Annotated[list[str] | None, typer.Option(help="used when no --deployment is given")] = None,
    deployment: Annotated[
        Path | None, typer.Option(help="read allowed measurements and node registrations on-chain")
    ] = None,
    dev_allow_simulated: Annotated[bool, typer.Option(help="DEVELOPMENT ONLY: release keys to simulated TEEs")] = False,
    rate_per_minute: Annotated[float, typer.Option()] = 30.0,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8090,
) -> None:
    """Run the key broker (FastAPI) for one bundle."""
    import uvicorn

    from dcml.client.attestation.verify import Policy
    from dcml.client.chain.registry import RegistryClient
    from dcml.client.publisher.key_broker import (
        AuditLog,
        ChainMeasurements,
        KeyBroker,
        ModelEntry,
        RateLimiter,
        RegistryNodeCheck,
        create_app,
    )

    if allow_measurement is None:
        allow_measurement = []
    signed = load_manifest(bundle)
    entry = ModelEntry(
        model_id=signed.manifest.model_id_bytes,
        key=read_key_file(key_file),
        allowed_measurements=frozenset(bytes.fromhex(m.removeprefix("0x")) for m in allow_measurement),
        bundle_dir=bundle,
        manifest=signed,
    )
    broker = KeyBroker(
        models={entry.model_id: entry},
        policy=Policy.load(policy),
        audit=AuditLog(db),
        allow_simulated=dev_allow_simulated,
        limiter=RateLimiter(per_minute=rate_per_minute),
    )
    if deployment is not None:
        dep = Deployment.load(deployment)
        w3 = connect(dep.rpc_url)
        broker.measurements = ChainMeasurements(w3, dep.model_registry)
        if dep.node_registry:
            broker.node_check = RegistryNodeCheck(RegistryClient(w3, dep.node_registry))
    if dev_allow_simulated:
        console.print("[bold red]!!! releasing model keys to SIMULATED TEEs: development only !!![/]")
    uvicorn.run(create_app(broker), host=host, port=port)


@model_app.command()
def revoke(
    db: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="the broker's database")],
    node: Annotated[str | None, typer.Option(help="node signing address")] = None,
    measurement: Annotated[str | None, typer.Option(help="measurement id or raw MRTD/RTMR (hex)")] = None,
    model: Annotated[str, typer.Option(help="model id (0x...) or * for every model")] = "*",
    note: Annotated[str, typer.Option()] = "",
) -> None:
    """Stop releasing keys to a node or an enclave build (applies to the next request; the broker
    reads revocations on every request). Also drop the measurement on-chain if it was published."""
    from dcml.client.publisher.key_broker import AuditLog

    if (node is None) == (measurement is None):
        raise typer.BadParameter("pass exactly one of --node or --measurement")
    kind, value = ("node", node) if node is not None else ("measurement", measurement or "")
    log = AuditLog(db)
    log.revoke(kind, value, model_id=model, note=note)
    console.print(f"revoked {kind} {value} for {model}")
