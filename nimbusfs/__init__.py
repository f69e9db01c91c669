"""nimbusfs: a cloud drive you mount, and the service that serves it.

Where things live:

- ``mount/``: the FUSE mount (pyfuse3 adapter, VFS, a file's content);
- ``cache/``: the local block cache and the staging of dirty bytes;
- ``blockstore/``: the block stores behind one interface, and chunking;
- ``server/``: the metaserver (mount protocol, namespace transactions, PostgreSQL);
- ``api.py``: the HTTP API, a thin layer over the server's namespace functions;
- ``client.py`` and ``protocol.py``: the mount protocol's client and framing;
- ``errors.py`` and ``posix.py``: errors and POSIX rules every layer shares;
- ``cli.py`` and ``embedded.py``: the ``nimbusfs`` command and the embedded default.
"""
