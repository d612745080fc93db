"""What the routes share, built once by the app factory and kept on `app.state.node`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from dcml.node.api.metrics import NodeMetrics
from dcml.node.api.sealing import ReplayCache
from dcml.node.config import NodeSettings
from dcml.node.engine.base import Engine
from dcml.node.identity import EnclaveIdentity
from dcml.node.payments.gate import PaymentGate
from dcml.node.receipts.signer import ReceiptSigner
from dcml.node.receipts.store import ReceiptStore
from dcml.node.tee.base import AttestationProvider


@dataclass
class NodeState:
    settings: NodeSettings
    engine: Engine
    identity: EnclaveIdentity
    provider: AttestationProvider
    store: ReceiptStore
    signer: ReceiptSigner
    metrics: NodeMetrics
    node_version: str
    gate: PaymentGate | None = None  # None: payments off, every request is free
    replay: ReplayCache = field(default_factory=ReplayCache)  # sealed requests already answered


def node_state(request: Request) -> NodeState:
    return request.app.state.node
