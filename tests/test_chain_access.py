"""Chain access (issue 11, deliverable 1): one connection helper with a timeout and a chain check, and a contract
client base whose refusals are one typed error naming the contract's own custom error."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from dcml.client.chain.connect import WrongChain, connect
from dcml.client.chain.sla import SLACourtClient, SLAError
from dcml.client.chain.tx import TransactionFailed
from dcml.client.wire.errors import ChainError, DcmlError


def test_connect_checks_the_chain_it_reaches(deployment) -> None:
    assert connect(deployment.rpc_url, chain_id=deployment.chain_id).eth.chain_id == deployment.chain_id
    with pytest.raises(WrongChain, match=f"chain {deployment.chain_id}.*says 1") as info:
        connect(deployment.rpc_url, chain_id=1)
    assert isinstance(info.value, ChainError) and info.value.to_wire()["error"]["code"] == "wrong_chain"


def test_an_rpc_that_never_answers_fails_the_call_instead_of_hanging() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, reads, never answers
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(16)], daemon=True).start()
    w3 = connect(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        _ = w3.eth.block_number
    assert time.monotonic() - started < 20  # web3 retries a read a few times, each cut at timeout_s
    listener.close()


def test_a_revert_is_one_typed_error_with_the_contracts_error_name(w3, deployment, payer) -> None:
    court = SLACourtClient(w3, deployment.sla_court)
    with pytest.raises(SLAError) as info:
        court.finalize(payer, b"\x01" * 32)  # no such dispute
    err = info.value
    assert isinstance(err, TransactionFailed) and isinstance(err, DcmlError)
    assert err.reason in court.error_names and err.action == "finalize"
    assert str(err) == f"SLA court refused finalize: {err.reason}"
    assert err.to_wire()["error"] == {"message": str(err), "type": "chain_error", "param": None, "code": err.reason}
