"""qemu-img-style jobs as Python coroutines (with sync twins): one module per job.

The core driver (format, metadata, mapping, writes, image, io) stays flat in
:mod:`qcow2aio`; what is built *on* it — copying, comparing, measuring — lives here,
each job using the public image API rather than reimplementing any of it. The
``qcow2aio`` command (:mod:`qcow2aio.cli`) only parses arguments and prints; the work is
done by these modules, so a storage service can await the same jobs beside its own I/O.
"""
