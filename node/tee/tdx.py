"""TDX quotes from the Linux configfs-tsm ABI (Documentation/ABI/testing/configfs-tsm-report).

mkdir a report entry, write report_data to `inblob`, read the quote from `outblob`, check that
`generation` counts only our write (no concurrent writer changed inblob), then rmdir the entry.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from dcml.node.tee.base import Evidence, TeeError, check_report_data

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"


class ConfigfsOps:
    """The filesystem calls the provider makes. Tests subclass it to emulate the kernel's reactions
    (a plain directory cannot produce an outblob when inblob is written); the provider logic is the same."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)  # configfs removes the attribute files with the entry


class TdxProvider:
    tee_type = "tdx"

    def __init__(self, root: str | Path = DEFAULT_ROOT, ops: ConfigfsOps | None = None) -> None:
        self.root = Path(root)
        self.ops = ops or ConfigfsOps()
        if not self.root.is_dir():
            raise TeeError(
                f"{self.root} does not exist: this is not a TDX guest with configfs-tsm "
                "(needs Linux >= 6.7, `mount -t configfs none /sys/kernel/config`), or use another provider"
            )

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        entry = self.root / f"dcml-{uuid.uuid4().hex}"
        try:
            self.ops.mkdir(entry)
        except OSError as exc:
            raise TeeError(f"cannot create {entry}: {exc} (run as root inside the TD)") from exc
        try:
            provider = self.ops.read(entry / "provider").decode().strip()
            if provider != "tdx_guest":
                raise TeeError(f"configfs-tsm provider is {provider!r}, not tdx_guest: this is not a TDX guest")
            self.ops.write(entry / "inblob", report_data)
            quote = self.ops.read(entry / "outblob")
            generation = int(self.ops.read(entry / "generation").decode().strip())
            if generation != 1:  # we wrote once to a fresh entry; anything else means another writer
                raise TeeError(f"report entry {entry.name} was written concurrently (generation {generation}); retry")
            if not quote:
                raise TeeError("the kernel returned an empty quote; check the TD's quoting service (QGS)")
            return Evidence(quote=quote, extra={"provider": provider})
        except OSError as exc:
            raise TeeError(f"configfs-tsm report failed: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):  # never mask the real error; the entry is ours alone
                self.ops.rmdir(entry)
