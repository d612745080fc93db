"""Pinned NVIDIA roots (package data): Device Identity CA and CoRIM signing root, from NVIDIA/nvtrust."""
