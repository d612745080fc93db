"""TDX quotes and KMS-derived keys from the dstack guest agent (dstack-sdk over its Unix socket)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from dstack_sdk import DstackClient

from dcml.node.tee.base import Evidence, TeeError, check_report_data

DEFAULT_ENDPOINT = "/var/run/dstack.sock"
IDENTITY_KEY_PATH = "dcml/identity/v1"
IDENTITY_KEY_PURPOSE = "enclave-identity"


class DstackProvider:
    tee_type = "dstack"

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0) -> None:
        try:
            self._client = DstackClient(endpoint, timeout=timeout)
        except FileNotFoundError as exc:
            raise TeeError(
                f"dstack guest agent socket {endpoint} not found: mount /var/run/dstack.sock into the "
                "container (docker-compose volumes) or choose another TEE provider"
            ) from exc
        self.endpoint = endpoint
        self._app_info: dict[str, Any] | None = None

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        try:
            resp = self._client.get_quote(report_data)
            app_info = self.app_info()
        except httpx.HTTPError as exc:
            raise TeeError(f"dstack GetQuote via {self.endpoint} failed: {exc}") from exc
        return Evidence(
            quote=resp.decode_quote(),
            event_log=json.loads(resp.event_log),
            extra={"app_info": app_info, "vm_config": resp.vm_config},
        )

    def app_info(self) -> dict[str, Any]:
        """dstack Info (app id, compose hash, app_compose...): fixed for this boot, so cached."""
        if self._app_info is None:
            info = self._client.info()
            data = info.model_dump(exclude={"app_cert"})
            data["tcb_info"] = info.tcb_info.model_dump(exclude={"event_log"})  # the quote carries it
            self._app_info = data
        return self._app_info

    def derive_identity_seed(self) -> bytes:
        """A KMS-derived secret, stable for this app across restarts: feed it to EnclaveIdentity.from_seed."""
        try:
            key = self._client.get_key(IDENTITY_KEY_PATH, IDENTITY_KEY_PURPOSE).decode_key()
        except httpx.HTTPError as exc:
            raise TeeError(f"dstack GetKey via {self.endpoint} failed: {exc}") from exc
        if len(key) < 32:
            raise TeeError(f"dstack GetKey returned {len(key)} bytes; expected a 32-byte key")
        return key
