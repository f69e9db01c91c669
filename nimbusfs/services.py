"""nimbusfs the way Linux admins run it: ``mount -t fuse.nimbusfs``, fstab, systemd units.

The mount helper follows fuse(8)'s convention, with no helper file of our
own to install: for type ``fuse.nimbusfs`` mount(8) finds no
``/sbin/mount.fuse.nimbusfs`` and runs ``/sbin/mount.fuse`` (mount.fuse3),
which drops the options meant for mount(8) itself (``_netdev``, ``nofail``,
``auto``, ``noauto``, ``user``, ``users``, ``nouser``), adds ``dev`` and
``suid`` unless ``nodev``/``nosuid`` were given, and runs, through
``/bin/sh``, the program named by the subtype::

    nimbusfs SOURCE MOUNTPOINT -o OPTIONS

mount(8) never passes ``x-*`` options (``x-systemd.automount``...) to a helper:
they are systemd-fstab-generator's. :func:`helper_argv` turns that call into
the ordinary ``nimbusfs mount MOUNTPOINT --server SOURCE ...``, which starts
the mount process in the background and returns once the mount is live, as
mount(8) expects of a helper. One parser of options (``nimbusfs mount``'s)
serves the command line, fstab and the units.

Under systemd the logs go to the journal: a helper run by a ``.mount`` unit
(stderr is the journal, :func:`stderr_is_journal`) leaves its mount process
on that stderr instead of a log file of its own, and the units' processes
log to stderr. :func:`notify_ready` tells systemd (``Type=notify``) that a
mount is live, so that units ordered after it start only then.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys

# Options mount(8) or mount.fuse3 may pass that mean nothing to the mount
# process: a FUSE mount is always nodev,nosuid (libfuse's default; the ``dev``
# and ``suid`` mount.fuse3 adds are ignored, never granted), rw is the default.
IGNORED = {"rw", "dev", "suid", "nodev", "nosuid", "defaults", "_netdev", "nofail",
           "auto", "noauto", "user", "users", "nouser"}
# fstab options that are flags of ``nimbusfs mount``.
FLAGS = {"ro": "--read-only", "allow_other": "--allow-other", "insecure": "--insecure"}
# fstab options with a value: the ``nimbusfs mount`` option of the same name
# with dashes (``token_file=`` is ``--token-file``); ``home=`` is the global
# ``--home`` (where mount records and, outside systemd, logs are kept).
VALUED = {"server", "token_file", "cache_dir", "cache_size", "blocks", "outage_timeout",
          "label", "tls_ca", "tls_fingerprint"}


def is_helper_call(argv: list[str], commands: set[str]) -> bool:
    """Whether ``argv`` is mount.fuse3's ``SOURCE MOUNTPOINT [-o OPTIONS]``, not a command."""
    return len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in commands


def helper_argv(argv: list[str]) -> list[str]:
    """``SOURCE MOUNTPOINT [-o OPTS]...`` → ``[--home H] mount MOUNTPOINT --server ... ...``.

    SOURCE is the metaserver's ``HOST:PORT`` unless ``server=`` names it
    (then SOURCE is only the name ``/proc/mounts`` would show). The token is
    read from ``token_file=``: an fstab line is world-readable, and a command
    line is visible to every user in ps. An option this does not know fails
    the mount with its name: silently ignoring e.g. ``noexec`` would mount with
    less protection than the admin asked for.
    """
    p = argparse.ArgumentParser(prog="nimbusfs SOURCE MOUNTPOINT",
                                description="the mount helper form (mount -t fuse.nimbusfs)")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-n", "-s", "-v", "-f"):  # mount(8)'s: no mtab, sloppy, verbose, fake
        p.add_argument(flag, action="store_true")
    p.add_argument("-t", dest="type")
    args = p.parse_args(argv)
    home: list[str] = []
    out = ["mount", args.mountpoint]
    unknown = []
    values: dict[str, str] = {}
    for opt in (o for group in args.options for o in group.split(",") if o):
        key, eq, value = opt.partition("=")
        if opt in IGNORED or key.startswith("x-") or key == "comment":
            continue
        if opt in FLAGS:
            out.append(FLAGS[opt])
        elif eq and key == "home":
            home = ["--home", value]
        elif eq and key in VALUED:
            values[key] = value
        else:
            unknown.append(opt)
    if unknown:
        raise SystemExit(f"nimbusfs: unknown mount option(s) {','.join(unknown)}; known:"
                         f" {', '.join(sorted([*FLAGS, *VALUED, 'home']))} and"
                         f" {', '.join(sorted(IGNORED))} (ignored)")
    values.setdefault("server", args.source)
    if ":" not in values["server"]:
        raise SystemExit(f"nimbusfs: no metaserver: SOURCE {args.source!r} is not HOST:PORT"
                         " and no server= option names one")
    if "token_file" not in values:
        raise SystemExit("nimbusfs: token_file= is required (a file holding the token,"
                         " readable by root only)")
    for key, value in values.items():
        out += ["--" + key.replace("_", "-"), value]
    return [*home, *out]


def mounted(path: str) -> bool:
    """Whether ``path`` is a mount point, read from /proc/self/mountinfo.

    Not ``os.path.ismount``: its stat of a nimbusfs mount point whose server is
    unreachable waits the mount's outage timeout (the root's attributes may
    have to be asked for), and ``umount`` of such a mount must not.
    """
    want = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        # Field 5 is the mount point, its space, tab, newline and backslash
        # written as octal escapes (\040 ...); other bytes (UTF-8) as they are.
        return any(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]),
                          line.split()[4]) == want for line in f)


def stderr_is_journal() -> bool:
    """Whether this process's stderr is systemd's journal (``$JOURNAL_STREAM``, as
    systemd.exec(5) says to check it: the device and inode of the stream)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def notify_ready() -> None:
    """Send ``READY=1`` to systemd if it waits for it (``$NOTIFY_SOCKET``, sd_notify(3))."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(b"READY=1")


# --- systemd units ----------------------------------------------------------------------

SERVER_UNIT = """\
[Unit]
Description=nimbusfs metaserver (mount protocol and HTTP API)
Documentation=file://{docs}
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
# NIMBUSFS_DSN, NIMBUSFS_SERVER_ARGS (--listen, --blocks, --http, --tls-cert ...),
# and GOOGLE_APPLICATION_CREDENTIALS for a gs:// store.
EnvironmentFile={etc}/server.env
# The server reads NIMBUSFS_DSN from its environment: on its command line the
# DSN (and a password in it) would be readable by every local user (ps).
ExecStart={bin} server $NIMBUSFS_SERVER_ARGS
# The schema is migrated at start under an advisory lock, so restarts and
# replicas starting together are safe.
Restart=on-failure
RestartSec=2
# Logs: stderr, to the journal (journalctl -u nimbusfs-server).
DynamicUser=yes
StateDirectory=nimbusfs-server
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""

MOUNT_UNIT = """\
[Unit]
Description=nimbusfs mount at %f
Documentation=file://{docs}
Wants=network-online.target
After=network-online.target nimbusfs-server.service
Before=remote-fs.target

[Service]
# The instance is the mount point, systemd-escaped: nimbusfs@home-alice-Nimbus
# mounts /home/alice/Nimbus (systemd-escape --path /home/alice/Nimbus).
# NIMBUSFS_SERVER, NIMBUSFS_TOKEN_FILE, NIMBUSFS_MOUNT_ARGS (--cache-size ...).
EnvironmentFile={etc}/mount-%i.env
Type=notify
NotifyAccess=main
ExecStart={bin} mount %f --foreground --server ${{NIMBUSFS_SERVER}} \\
    --token-file ${{NIMBUSFS_TOKEN_FILE}} $NIMBUSFS_MOUNT_ARGS
# A mount process that died leaves its mount point "not connected": release
# it so that the restart can mount again (fails harmlessly when unmounted).
ExecStopPost=-/bin/fusermount3 -u -z %f
Restart=on-failure
RestartSec=2
# SIGTERM commits every open file, then unmounts: allow the store's outage
# timeout (--outage-timeout, 60 s by default) and then some.
TimeoutStopSec=150
KillMode=mixed

[Install]
WantedBy=remote-fs.target
"""

SERVER_ENV = """\
# nimbusfs-server.service (mode 0600: the DSN may hold a password)
NIMBUSFS_DSN=host=127.0.0.1 dbname=nimbus user=nimbus password=CHANGE-ME
NIMBUSFS_SERVER_ARGS=--listen 0.0.0.0:7070 --blocks gs://BUCKET/blocks --http 0.0.0.0:7443 \\
 --tls-cert /etc/nimbusfs/cert.pem --tls-key /etc/nimbusfs/key.pem
#GOOGLE_APPLICATION_CREDENTIALS=/etc/nimbusfs/gcs-key.json
"""

MOUNT_ENV = """\
# nimbusfs@MOUNTPOINT.service: copy to {etc}/mount-INSTANCE.env, where INSTANCE
# is `systemd-escape --path MOUNTPOINT` (e.g. mount-home-alice-Nimbus.env)
NIMBUSFS_SERVER=server.example:7070
NIMBUSFS_TOKEN_FILE=/etc/nimbusfs/alice.token
NIMBUSFS_MOUNT_ARGS=--tls-fingerprint AB:CD:... --cache-size 20G
"""


def install_units(prefix: str, command: str, docs: str) -> list[str]:
    """Write the units and example environment files under ``prefix``; return the paths.

    ``command`` is the absolute path of the ``nimbusfs`` program the units
    run. Example files never overwrite an admin's (``*.example``); units do
    (they are ours: an admin's changes belong in drop-ins,
    ``systemctl edit``).
    """
    units = os.path.join(prefix, "etc/systemd/system")
    etc = "/etc/nimbusfs"
    umask = os.umask(0o022)  # directories a packager's staging root gets as / has them
    try:
        os.makedirs(units, exist_ok=True)
    finally:
        os.umask(umask)
    os.makedirs(os.path.join(prefix, etc.lstrip("/")), mode=0o700, exist_ok=True)
    written = []
    for name, text, mode in (
            (os.path.join(units, "nimbusfs-server.service"), SERVER_UNIT, 0o644),
            (os.path.join(units, "nimbusfs@.service"), MOUNT_UNIT, 0o644),
            (os.path.join(prefix, etc.lstrip("/"), "server.env.example"), SERVER_ENV, 0o600),
            (os.path.join(prefix, etc.lstrip("/"), "mount.env.example"), MOUNT_ENV, 0o600)):
        tmp = name + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
            f.write(text.format(bin=command, etc=etc, docs=docs))
        os.chmod(tmp, mode)
        os.rename(tmp, name)
        written.append(name)
    return written
