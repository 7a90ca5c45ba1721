"""Settings: the pydantic model of ``config/settings.toml``, the only reader of TOML and env.

Settings are loaded once by the CLI (:func:`load_settings`) and passed down, frozen; no
other module reads files or the environment for configuration (uvicorn's Config/Server
split). Every key can be overridden by ``MAILDEFER_<SECTION>__<KEY>``; an unknown key or a
bad value raises :class:`~maildefer.errors.ConfigError` with one line naming the key, the
value and what was expected, which the CLI turns into exit status 2 before binding anything.

Example:
    >>> s = Settings()
    >>> s.server.port
    8823
    >>> s.queue_settings("run/posts").max_attempts
    5
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from maildefer.errors import ConfigError
from maildefer.loops import LoopName

DEFAULT_CONFIG = Path("config/settings.toml")

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(BaseModel):
    """``[server]``: the SMTP/LMTP listener (``maildefer serve``).

    Example:
        >>> ServerSettings(port=2525).max_message_size
        33554432
    """

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=8823, ge=0, le=65535)
    hostname: str = Field(default_factory=socket.getfqdn, min_length=1)
    handlers: list[str] = Field(default_factory=lambda: ["app.handlers.posting"])
    max_message_size: int = Field(default=33_554_432, gt=0)
    max_recipients: int = Field(default=100, gt=0)
    handler_timeout: float = Field(default=60.0, gt=0)
    lmtp: bool = False
    # Limits a client controls (docs/reliability.md R24-R26); the defaults are Postfix's.
    max_connections: int = Field(default=500, gt=0)
    max_connections_per_ip: int = Field(default=50, gt=0)
    command_timeout: float = Field(default=300.0, gt=0)
    data_min_rate: int = Field(default=500, ge=0, description="bytes/s a DATA upload must keep")
    max_bad_commands: int = Field(default=20, gt=0)
    grace_period: float = Field(default=30.0, ge=0)
    smtputf8: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PROXY protocol (maildefer/smtp/proxy.py): behind HAProxy or a cloud load balancer,
    # the client's own address comes in a header, believed only from these peers.
    proxy_protocol: bool = False
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(
        default_factory=lambda: [ip_network("127.0.0.1/32")]
    )
    proxy_timeout: float = Field(default=5.0, gt=0, description="seconds for the header")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        """Each entry an IPv4 or IPv6 network, or one address; host bits set is an error.

        Example:
            >>> ServerSettings(trusted_proxies=["10.0.0.0/8", "2001:db8::1"]).trusted_proxies
            [IPv4Network('10.0.0.0/8'), IPv6Network('2001:db8::1/128')]
        """
        if not isinstance(value, list | tuple):
            return value  # pydantic says "a list was expected"
        networks = []
        for item in value:
            try:
                if not isinstance(item, str | IPv4Network | IPv6Network):
                    raise TypeError("not a string")  # ip_network(3) would be 0.0.0.3
                networks.append(ip_network(item))
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"{item!r} is not an IP network ({exc}); expected networks like"
                    " '10.0.0.0/8' or '2001:db8::/32', or single addresses"
                ) from None
        return networks

    @field_validator("trusted_proxies")
    @classmethod
    def _some_proxy(
        cls, value: list[IPv4Network | IPv6Network], info: ValidationInfo
    ) -> list[IPv4Network | IPv6Network]:
        if info.data.get("proxy_protocol") and not value:
            raise ValueError("empty: with proxy_protocol = true no connection could be accepted")
        return value

    # Disk guard (docs/reliability.md R8): below this many bytes free on a queue's
    # filesystem, MAIL FROM gets 452 4.3.1. None: 2 x max_message_size (Postfix's
    # queue_minfree advice, 1.5-2 x the size limit); 0 turns the guard off.
    min_free_space: int | None = Field(default=None, ge=0)

    @property
    def min_free_bytes(self) -> int:
        """The disk guard's threshold in bytes (``min_free_space``, or its default).

        Example:
            >>> ServerSettings(max_message_size=10_000).min_free_bytes
            20000
            >>> ServerSettings(min_free_space=0).min_free_bytes
            0
        """
        if self.min_free_space is None:
            return 2 * self.max_message_size
        return self.min_free_space

    # Bounded memory under big mail (docs/operations.md, "Memory and the spool"): message
    # bytes held in memory across all sessions, and the size past which one is spooled.
    memory_budget: int = Field(default=67_108_864, ge=1_048_576)
    spool_threshold: int = Field(default=1_048_576, ge=65_536)
    spool_dir: Path | None = None  # None: the tmp/ of the first maildir queue, else $TMPDIR

    @model_validator(mode="after")
    def _spool_threshold_within_budget(self) -> ServerSettings:
        if self.spool_threshold > self.memory_budget:
            raise ValueError(
                f"spool_threshold ({self.spool_threshold}) must not exceed memory_budget"
                f" ({self.memory_budget})"
            )
        return self


class RouterSettings(BaseModel):
    """``[router]``: shared regexes for named route groups (Lamson's ``router_defaults``).

    Example:
        >>> RouterSettings(defaults={"host": "example\\\\.com"}).defaults["host"]
        'example\\\\.com'
    """

    model_config = _STRICT

    defaults: dict[str, str] = Field(default_factory=dict)
    state_store: Path = Path("run/state.db")

    @field_validator("defaults")
    @classmethod
    def _regexes_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"group {name!r} is not a valid regex ({exc})") from None
        return value


class RelaySettings(BaseModel):
    """``[relay]``: where outgoing mail (``relay.deliver``) goes: a smarthost.

    ``password`` is a ``SecretStr``: its repr, a dump and every error message show
    ``**********`` (set it in ``MAILDEFER_RELAY__PASSWORD`` to keep it out of the file).
    ``ca_file`` must exist (checked by :class:`Settings`, relative to the project root).

    Example:
        >>> r = RelaySettings(port=587, starttls=True, username="app", password="s3cret")
        >>> r.port, r.password
        (587, SecretStr('**********'))
        >>> RelaySettings(starttls=True, tls=True)
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for RelaySettings
        tls
          Value error, starttls and tls cannot both be true: ...
    """

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=8825, ge=1, le=65535)
    starttls: bool = False
    tls: bool = False
    username: str = ""
    password: SecretStr = SecretStr("")
    ca_file: str = ""
    timeout: float = Field(default=30.0, gt=0)

    @field_validator("tls")
    @classmethod
    def _one_kind_of_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("starttls"):
            raise ValueError(
                "starttls and tls cannot both be true: STARTTLS upgrades a plain port"
                " (587), tls is TLS from the first byte (465)"
            )
        return value


class QueueSettings(BaseModel):
    """``[queues.NAME]``: one queue, its handlers and its retry policy.

    Example:
        >>> QueueSettings(path="run/posts").retry_delay
        30.0
    """

    model_config = _STRICT

    path: str
    handlers: list[str] = Field(default_factory=list)
    concurrency: int = Field(default=8, gt=0, le=10_000)
    max_attempts: int = Field(default=5, gt=0)
    retry_delay: float = Field(default=30.0, ge=0)
    retry_max_delay: float = Field(default=3600.0, ge=0)
    handler_timeout: float = Field(default=300.0, gt=0)
    # Safety net under inotify: list new/ at least this often (docs/reliability.md R16).
    rescan_interval: float = Field(default=10.0, gt=0)
    # A shared filesystem (NFS): inotify cannot see other hosts' writes, so poll (R18).
    shared_fs: bool = False
    poll_interval: float = Field(default=1.0, gt=0)
    # A claim by another host whose file was not touched for this long is recovered (R10).
    lease: float = Field(default=600.0, gt=0)
    # A message whose handler killed its worker this many times is quarantined (R11).
    max_recoveries: int = Field(default=3, gt=0)
    grace_period: float = Field(default=30.0, ge=0)
    # How a maildir push makes its file durable: "syncfs" flushes a batch of files with
    # one syncfs(2) (group commit; it flushes the whole filesystem), "fsync" each file on
    # its own; "auto" is syncfs on Linux >= 5.8 unless shared_fs, else fsync.
    sync: Literal["auto", "fsync", "syncfs"] = "auto"
    # An amqp queue: seconds one connection attempt to one broker node may take, and a
    # publisher confirm may take. While no node answers, a push fails within about
    # connect_timeout per node (serve answers 451), well under an SMTP client's timeout.
    connect_timeout: float = Field(default=5.0, gt=0)
    publish_timeout: float = Field(default=10.0, gt=0)


class UndeliverableSettings(BaseModel):
    """``[undeliverable]``: where messages go after their last failed attempt.

    Example:
        >>> UndeliverableSettings().path
        'run/undeliverable'
    """

    model_config = _STRICT

    path: str = "run/undeliverable"


class ViewSettings(BaseModel):
    """``[view]``: the Jinja2 templates of ``view.respond`` and ``view.render``.

    Example:
        >>> ViewSettings().templates
        PosixPath('app/templates')
    """

    model_config = _STRICT

    # Relative to the project root, like every path (Settings.resolve).
    templates: Path = Path("app/templates")


class MetricsSettings(BaseModel):
    """``[metrics]``: the Prometheus endpoint, off unless ``port`` is set.

    Example:
        >>> MetricsSettings().port is None
        True
    """

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)


class LoggingSettings(BaseModel):
    """``[logging]``: level and format (``auto`` is console in a TTY, JSON otherwise).

    Example:
        >>> LoggingSettings().format
        'auto'
    """

    model_config = _STRICT

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RuntimeSettings(BaseModel):
    """``[runtime]``: how ``serve`` and ``worker`` run (the event loop; see ``maildefer.loops``).

    ``loop`` is ``"asyncio"`` (the stdlib loop), ``"uvloop"`` (needs
    ``pip install 'maildefer[uvloop]'``) or ``"auto"`` (uvloop when installed).
    ``--loop`` on ``serve`` and ``worker`` overrides it.

    Example:
        >>> RuntimeSettings().loop
        'auto'
    """

    model_config = _STRICT

    # uvloop when installed: measured 8-25 % more SMTP ingest and 5-9 % faster worker
    # drains than the stdlib loop (docs/benchmarks.md), and the suite passes on both.
    loop: LoopName = "auto"


def nameserver_address(text: str) -> tuple[str, int]:
    """A ``[auth] nameservers`` entry as (IP address, port): ``"host"`` or ``"host:port"``.

    The host is an IP address (a name would need a resolver of its own); IPv6 with a
    port is written in brackets.

    Raises:
        ValueError: not an IP address, or a bad port.

    Example:
        >>> nameserver_address("127.0.0.1:5353"), nameserver_address("[::1]:53")
        (('127.0.0.1', 5353), ('::1', 53))
        >>> nameserver_address("2001:db8::1"), nameserver_address("9.9.9.9")
        (('2001:db8::1', 53), ('9.9.9.9', 53))
    """
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, sep, after = host[1:].partition("]")
        if not sep or (after and not after.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6] or [IPv6]:port")
        port = after[1:] or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: expected an IP address, optionally with :port") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return str(address), int(port)


class AuthSettings(BaseModel):
    """``[auth]``: SPF, DKIM and DMARC checked on every message ``serve`` receives.

    ``timeout`` bounds all the DNS lookups of one message together (past it, what is
    still unknown is ``temperror``); it must stay under ``[server] handler_timeout``.
    Messages over ``max_verify_size`` bytes are not DKIM-verified (``dkim=permerror``):
    the verifier holds a few copies of the message in memory.

    Example:
        >>> AuthSettings(verify=True, nameservers=["127.0.0.1:5353"]).timeout
        5.0
        >>> AuthSettings(nameservers=["dns.example"])
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for AuthSettings
        nameservers
          Value error, 'dns.example': expected an IP address, optionally with :port ...
    """

    model_config = _STRICT

    verify: bool = False
    nameservers: list[str] = Field(default_factory=list)
    timeout: float = Field(default=5.0, gt=0)
    max_verify_size: int = Field(default=10_485_760, ge=0)

    @field_validator("nameservers")
    @classmethod
    def _nameservers_parse(cls, value: list[str]) -> list[str]:
        for entry in value:
            nameserver_address(entry)
        return value


class Settings(BaseSettings):
    """All of ``settings.toml``, with ``MAILDEFER_<SECTION>__<KEY>`` overrides.

    ``root`` is the project directory (the one holding ``config/``); relative paths in
    the settings are resolved against it by :meth:`resolve`.

    Example:
        >>> s = Settings(server={"port": 2525})
        >>> s.server.port
        2525
    """

    model_config = SettingsConfigDict(
        env_prefix="MAILDEFER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    root: Path = Field(default_factory=Path.cwd)
    server: ServerSettings = Field(default_factory=ServerSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    queues: dict[str, QueueSettings] = Field(default_factory=dict)
    undeliverable: UndeliverableSettings = Field(default_factory=UndeliverableSettings)
    view: ViewSettings = Field(default_factory=ViewSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @field_validator("auth")
    @classmethod
    def _auth_within_handler_timeout(cls, auth: AuthSettings, info: ValidationInfo) -> AuthSettings:
        # The checks run before the handlers, inside the same DATA: a DNS timeout as long
        # as the handlers' would let a dead resolver stall every message past it.
        server = info.data.get("server")
        if (
            auth.verify
            and isinstance(server, ServerSettings)
            and auth.timeout >= server.handler_timeout
        ):
            raise ConfigError(
                f"auth.timeout = {auth.timeout!r}: must be less than server.handler_timeout"
                f" ({server.handler_timeout!r})"
            )
        return auth

    @field_validator("relay")
    @classmethod
    def _ca_file_exists(cls, relay: RelaySettings, info: ValidationInfo) -> RelaySettings:
        # Here, not in RelaySettings: a relative ca_file needs the root. A ConfigError
        # rather than a ValueError: pydantic's error would quote the whole [relay] table.
        root = info.data.get("root", Path.cwd())
        if relay.ca_file and not (Path(root) / relay.ca_file).is_file():
            raise ConfigError(
                f"relay.ca_file = {relay.ca_file!r}: no such file (relative paths are"
                f" relative to {root})"
            )
        return relay

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the TOML values passed in: env overrides the file."""
        return (env_settings, init_settings)

    def resolve(self, path: str | Path) -> Path:
        """A settings path made absolute against the project root.

        Example:
            >>> Settings(root=Path("/srv/app")).resolve("run/posts")
            PosixPath('/srv/app/run/posts')
        """
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def undeliverable_ref(self) -> str:
        """Where buried messages go: an ``amqp://`` URL as written, else the resolved path.

        :meth:`resolve` would fold a URL's ``//`` into a path, and the broker backend would
        then fall back to ``NAME.undeliverable`` instead of the queue the URL names.

        Example:
            >>> Settings(root=Path("/srv/app")).undeliverable_ref()
            '/srv/app/run/undeliverable'
            >>> Settings(undeliverable={"path": "amqp://h/?queue=dead"}).undeliverable_ref()
            'amqp://h/?queue=dead'
        """
        path = self.undeliverable.path
        return path if "://" in path else str(self.resolve(path))

    def queue_settings(self, ref: str) -> QueueSettings:
        """The settings of a queue named by its table name, path or URL.

        A path or URL that no ``[queues.*]`` table names gets the defaults.

        Example:
            >>> s = Settings(queues={"posts": {"path": "run/posts", "concurrency": 2}})
            >>> s.queue_settings("posts").concurrency
            2
            >>> s.queue_settings("run/posts").concurrency
            2
        """
        if ref in self.queues:
            return self.queues[ref]
        for queue in self.queues.values():
            if queue.path == ref or (
                "://" not in ref and self.resolve(queue.path) == self.resolve(ref)
            ):
                return queue
        return QueueSettings(path=ref)


def _describe(error: Mapping[str, Any]) -> str:
    """One readable clause for one pydantic error: key, value, expectation."""
    key = ".".join(str(part) for part in error.get("loc", ())) or "(settings)"
    # A secret's value never reaches an error line, even a bad one (a password = 123).
    value = "'**********'" if re.search(r"password|secret", key) else repr(error.get("input"))
    if error.get("type") == "extra_forbidden":
        return f"{key}: unknown key (value {value})"
    return f"{key} = {value}: {error.get('msg', 'invalid')}"


def load_settings(path: Path | None = None) -> Settings:
    """Read the settings file, apply ``MAILDEFER_*`` environment overrides, validate.

    Args:
        path: the TOML file; ``None`` means ``config/settings.toml`` under the current
            directory, and defaults when that file does not exist.

    Returns:
        Frozen, validated settings with ``root`` set to the directory holding ``config/``.

    Raises:
        ConfigError: the file is missing (when named), unreadable, not TOML, or a key or
            value is invalid. The message is one line.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "config").mkdir()
        >>> _ = (d / "config" / "settings.toml").write_text("[server]\\nport = 2600\\n")
        >>> load_settings(d / "config" / "settings.toml").server.port
        2600
    """
    explicit = path is not None
    config_path = (path or DEFAULT_CONFIG).absolute()
    data: dict[str, Any] = {}
    if config_path.exists():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read settings: {exc}") from None
        root = config_path.parent.parent
    elif explicit:
        raise ConfigError(f"{config_path}: no such settings file")
    else:
        root = Path.cwd()
    if "root" in data:
        raise ConfigError(f"{config_path.name}: root: unknown key (value {data['root']!r})")
    try:
        return Settings(root=root, **data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{config_path.name}: {_describe(first)}{more}") from None
