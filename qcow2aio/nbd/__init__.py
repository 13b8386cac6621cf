"""The NBD export: qcow2 images served over the Network Block Device protocol.

``server = await qcow2aio.nbd.serve(Export(img, name="disk"), unix_path=...)`` serves
open images to stock clients (qemu-io, qemu-img, nbdinfo, nbdcopy, the kernel's
``nbd``); ``qcow2aio serve`` is the qemu-nbd-style command. :mod:`.protocol` holds the
wire format, :mod:`.server` the service (see docs/nbd.md).
"""

from __future__ import annotations

from .server import DEFAULT_PORT, Export, NbdServer, serve

__all__ = ["DEFAULT_PORT", "Export", "NbdServer", "serve"]
