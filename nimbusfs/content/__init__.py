"""File content, shared by every front end: the mount, ``nimbusfs cat`` and the HTTP server.

A file's committed content is a list of extents (``extents``); ``reader``
turns extents into bytes through the block cache (hash-checked, refetched,
read ahead); ``writer`` keeps a file's uncommitted changes (staging,
re-chunking, pipelined upload) and commits them. Both speak to the metadata
service through one small interface (``meta.Metadata``): the mount's protocol
client over TCP, or the namespace functions in-process on the server
(``nimbusfs.server.contentmeta``). JuiceFS's ``pkg/fs``, shared by its FUSE
mount, gateway and SDK, is the model.
"""

from nimbusfs.content.extents import Extents
from nimbusfs.content.meta import Metadata
from nimbusfs.content.writer import Content, Prepared, Writer

__all__ = ["Content", "Extents", "Metadata", "Prepared", "Writer"]
