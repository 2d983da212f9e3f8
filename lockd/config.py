"""Configuration: one frozen :class:`Config`, validated once, from defaults < file < options.

Theory of operation: ``lockd`` builds its Config exactly once at start-up with
:func:`load`; nothing else reads the environment or the config file afterwards. The CLI only
maps flags to keyword overrides. Paths follow DESIGN §1:

- as root: sockets in ``/run/lockd/``, state in ``/var/lib/lockd/``;
- as another user: ``$XDG_RUNTIME_DIR/lockd/`` and ``$XDG_STATE_HOME/lockd/``;
- ``$RUNTIME_DIRECTORY`` / ``$STATE_DIRECTORY`` (set by systemd's ``RuntimeDirectory=`` and
  ``StateDirectory=``) win over those defaults; ``--socket``, ``--admin-socket``,
  ``--state-dir`` and the config file win over both (options over the file).

The config file is TOML (default ``/etc/lockd/lockd.conf``; a missing default file is not an
error, a missing explicit one is). Every key, with its default, is in ``KEYS`` below and in
docs/operating.md. Unknown keys are refused: a typo must not silently leave a default in force.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/lockd/lockd.conf")
SOCKET_NAME = "lockd.sock"
ADMIN_SOCKET_NAME = "lockd-admin.sock"
JOURNAL_NAME = "journal.sqlite"
LOCKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FENCE_POLICIES = ("kill", "term", "none")
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is wrong."""


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def _first_dir(var: str) -> Path | None:
    # systemd sets e.g. STATE_DIRECTORY="/var/lib/lockd" (several dirs are ':'-separated)
    value = os.environ.get(var)
    return Path(value.split(":")[0]) if value else None


def default_runtime_dir() -> Path:
    from_systemd = _first_dir("RUNTIME_DIRECTORY")
    if from_systemd is not None:
        return from_systemd
    if os.geteuid() == 0:
        return Path("/run/lockd")
    return _xdg("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}") / "lockd"


def default_state_dir() -> Path:
    from_systemd = _first_dir("STATE_DIRECTORY")
    if from_systemd is not None:
        return from_systemd
    if os.geteuid() == 0:
        return Path("/var/lib/lockd")
    return _xdg("XDG_STATE_HOME", ".local/state") / "lockd"


def default_socket() -> Path:
    """The main socket a client talks to: ``$LOCKD_SOCKET`` or the default path."""
    env = os.environ.get("LOCKD_SOCKET")
    return Path(env) if env else default_runtime_dir() / SOCKET_NAME


def default_admin_socket() -> Path:
    env = os.environ.get("LOCKD_ADMIN_SOCKET")
    return Path(env) if env else default_runtime_dir() / ADMIN_SOCKET_NAME


@dataclass(frozen=True, slots=True)
class Config:
    state_dir: Path = field(default_factory=default_state_dir)
    socket: Path = field(default_factory=lambda: default_runtime_dir() / SOCKET_NAME)
    admin_socket: Path = field(default_factory=lambda: default_runtime_dir() / ADMIN_SOCKET_NAME)
    # group allowed to use the main socket (mode 0660 instead of 0600); None: root only
    socket_group: str | None = None
    # virtlockd's protocol on this socket (libvirt's /run/libvirt/virtlockd-sock) when not
    # socket-activated; None: not listening (under systemd, lockd-virtlockd.socket passes it)
    virtlockd_socket: Path | None = None
    # name -> directory of an indirect lockspace (lease files are DIR/sha256(resource))
    lockspaces: dict[str, Path] = field(default_factory=dict)
    # policy for owners registered without one: kill | term | none
    default_fence: str = "kill"
    # seconds between SIGTERM and SIGKILL under the "term" policy
    fence_grace: float = 10.0
    # SQLite PRAGMA synchronous; NORMAL is enough for process crashes in WAL (DESIGN §4.3)
    synchronous: str = "NORMAL"
    # history events kept (older ones are deleted in small batches, every second, after READY)
    history_retention: int = 100_000
    max_message: int = 64 * 1024
    max_connections: int = 4096
    max_owners: int = 4096
    max_leases_per_owner: int = 16_384
    max_leases: int = 65_536
    # systemd's fd store for lease fds: auto (on when socket-activated by our units, which
    # set FileDescriptorStoreMax=, or when systemd 254+ announces a store in $FDSTORE),
    # yes, no
    fd_store: str = "auto"
    # log level name for the daemon's own messages
    log_level: str = "INFO"
    # the event loop: uvloop (libuv; the I/O path in C, measured ~15% more pairs/s with 16
    # clients, bench/) or asyncio (the standard library's, pure Python)
    event_loop: str = "uvloop"
    # node_exporter's textfile directory: write DIR/lockd.prom (Prometheus text, atomically)
    # every metrics_interval seconds; None: never (prometheus-client is then never imported)
    metrics_textfile_dir: Path | None = None
    metrics_interval: float = 15.0
    # seconds between two verifications of the leases held in lockspaces on shared storage
    # (lockd/service/sharedfs.py); 0: never verify
    verify_interval: float = 5.0
    # lockspaces treated as shared storage (verified) whatever their filesystem type; those on
    # a network or cluster filesystem (NFS, GlusterFS, GFS2, CephFS, any FUSE...) are anyway.
    # An absolute path names the lockspace created on that directory over virtlockd's
    # protocol (libvirt's file_lockspace_dir: its name is its directory)
    shared_lockspaces: tuple[str, ...] = ()
    # lockspaces allowed on a mount that can drop a lock without telling (GlusterFS with
    # client.strict-locks off): warnings instead of refusing new leases there (and, for a
    # directory named by its path, refusing its creation); names as in shared_lockspaces
    allow_unsafe_storage: tuple[str, ...] = ()

    @property
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_NAME

    @property
    def lock_path(self) -> Path:
        """The fasteners inter-process lock that keeps a second daemon off this state dir."""
        return self.state_dir / "lockd.pid.lock"

    def validate(self) -> Config:
        for name in ("state_dir", "socket", "admin_socket"):
            value = getattr(self, name)
            if not isinstance(value, Path) or not value.is_absolute():
                raise ConfigError(f"{name} must be an absolute path, got {value!r}")
        if self.socket == self.admin_socket:
            raise ConfigError("socket and admin_socket must differ")
        if self.virtlockd_socket is not None:
            if (
                not isinstance(self.virtlockd_socket, Path)
                or not self.virtlockd_socket.is_absolute()
            ):
                raise ConfigError(
                    f"virtlockd_socket must be an absolute path, got {self.virtlockd_socket!r}"
                )
            if self.virtlockd_socket in (self.socket, self.admin_socket):
                raise ConfigError("virtlockd_socket must differ from socket and admin_socket")
        for ls, directory in self.lockspaces.items():
            if not LOCKSPACE_NAME.match(ls) or ls == "direct":
                raise ConfigError(f"lockspaces: invalid lockspace name {ls!r}")
            if not directory.is_absolute():
                raise ConfigError(f"lockspaces.{ls} must be an absolute directory")
        if self.default_fence not in FENCE_POLICIES:
            raise ConfigError(f"default_fence must be one of {', '.join(FENCE_POLICIES)}")
        if self.synchronous not in SYNCHRONOUS:
            raise ConfigError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        if self.fd_store not in ("auto", "yes", "no"):
            raise ConfigError("fd_store must be auto, yes or no")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError("event_loop must be uvloop or asyncio")
        if self.metrics_textfile_dir is not None and not self.metrics_textfile_dir.is_absolute():
            raise ConfigError("metrics_textfile_dir must be an absolute directory")
        if not self.metrics_interval >= 1:
            raise ConfigError("metrics_interval must be >= 1 (seconds)")
        if self.fence_grace < 0:
            raise ConfigError("fence_grace must be >= 0")
        if self.verify_interval < 0:
            raise ConfigError("verify_interval must be >= 0 (0: never verify)")
        for key in ("shared_lockspaces", "allow_unsafe_storage"):
            for ls in getattr(self, key):
                if ls in self.lockspaces or (
                    ls.startswith("/") and os.path.normpath(ls) == ls and "//" not in ls
                ):
                    continue  # a directory: the lockspace virtlockd's protocol creates there
                raise ConfigError(
                    f"{key}: {ls!r} is not a configured indirect lockspace, nor a directory "
                    "(an absolute, normalized path) of one created over virtlockd's protocol"
                )
        for name in (
            "history_retention",
            "max_connections",
            "max_owners",
            "max_leases_per_owner",
            "max_leases",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 1024 <= self.max_message <= 16 * 1024 * 1024:
            raise ConfigError("max_message must be between 1024 and 16777216")
        if self.socket_group is not None:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise ConfigError(f"socket_group: no such group {self.socket_group!r}") from None
        return self


# key -> (type accepted in TOML, converter)
KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "state_dir": (str, Path),
    "socket": (str, Path),
    "admin_socket": (str, Path),
    "socket_group": (str, str),
    "virtlockd_socket": (str, Path),
    "lockspaces": (dict, lambda d: {str(k): Path(v) for k, v in d.items()}),
    "default_fence": (str, str),
    "fence_grace": ((int, float), float),
    "synchronous": (str, lambda s: s.upper()),
    "history_retention": (int, int),
    "max_message": (int, int),
    "max_connections": (int, int),
    "max_owners": (int, int),
    "max_leases_per_owner": (int, int),
    "max_leases": (int, int),
    "fd_store": (str, str),
    "log_level": (str, lambda s: s.upper()),
    "event_loop": (str, str),
    "metrics_textfile_dir": (str, Path),
    "metrics_interval": ((int, float), float),
    "verify_interval": ((int, float), float),
    "shared_lockspaces": (list, tuple),
    "allow_unsafe_storage": (list, tuple),
}


def read_file(path: Path) -> dict[str, Any]:
    """The config file's keys, converted; ConfigError on a bad file or key."""
    import tomllib  # here: most daemons start without a config file (~2 ms of a start)

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}")
        accepted, convert = KEYS[key]
        if not isinstance(value, accepted) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{path}: lockspaces values must be directory paths")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: {key} must be a list of lockspace names")
        out[key] = convert(value)
    return out


def load(config_file: Path | None = None, **overrides: Any) -> Config:
    """Defaults < config file < overrides (None values are ignored). Validated."""
    values: dict[str, Any] = {}
    path = config_file if config_file is not None else DEFAULT_CONFIG_FILE
    if config_file is not None or path.exists():
        try:
            values.update(read_file(path))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except PermissionError:
            raise ConfigError(f"config file {path} is not readable") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Config(**values).validate()
