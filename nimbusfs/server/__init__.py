"""The metaserver: the mount protocol (``metaserver``), one transaction per
operation (``namespace``, ``feed``, ``uploads``), users and tokens (``auth``),
the trust model for blocks (``blocks``), PostgreSQL (``db``, ``migrations``)."""
