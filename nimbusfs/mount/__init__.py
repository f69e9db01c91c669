"""The FUSE mount: the pyfuse3 adapter (``adapter``), POSIX semantics over the
metaserver and the block cache (``vfs``), a file's content while open
(``filedata``: the content layer's writer with the mount's handles), and the mount
process (``serve``)."""
