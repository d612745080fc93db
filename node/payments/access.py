"""Reads only a channel's payer may make (`client.access`): is this signer the payer or its session key?"""

from __future__ import annotations

from dcml.node.payments.chain import ChannelChain, UnknownChannel


def payer_may_read(chain: ChannelChain, channel_id: str, signer: str | None) -> bool:
    """Blocking (a cached chain read): run it off the event loop."""
    if signer is None:
        return False
    try:
        raw = bytes.fromhex(channel_id.removeprefix("0x"))
        if len(raw) != 32 or not any(raw):
            return False
        state = chain.channel(raw)
    except (ValueError, UnknownChannel):
        return False
    return signer.lower() in {state.payer.lower(), state.authorized_signer.lower()}
