"""Attestation verification: TDX/dstack quotes, measurements policy, NVIDIA GPU evidence. Builds on the wire
formats only.
"""
