"""The FUSE mount: the pyfuse3 adapter (``adapter``), POSIX semantics over the
metaserver and the block cache (``vfs``), a file's content while open
(``filedata``), and the mount process (``serve``)."""
