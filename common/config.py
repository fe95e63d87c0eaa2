"""The one configuration object, built once at start-up from the environment and a TOML file:
nothing else reads the environment (tests build `Config`, or `load_config(environ={...})`)."""

from __future__ import annotations

import ipaddress
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from common.deployment import check_deployment
from common.errors import ConfigError, PackageError
from common.package import NAME_RE as NAME_RE
from common.package import load_manifest

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = f"sqlite:///{ROOT / 'var' / 'billing.sqlite'}"


NODE_PORT = 8765   # a cloud node listens here (provider option node_port): open it to browsers

@dataclass(frozen=True)
class Region:
    """A place nodes run in, served by one provider (two regions may share a place)."""

    name: str
    provider: str
    lat: float
    lon: float
    provider_region: str = ""   # the provider's own name for it (EC2: "us-west-2")
    max_nodes: int | None = None  # the provider's quota here; creating more fails over
    beacon_url: str = ""          # answers fast from inside the region: pages time it
    beacon_delay_ms: float = 0.0  # local runs: the webapp's /beacon/NAME answers this late


DRIVERS_OF_OUR_OWN = ("local", "byo")
# The libcloud drivers we have a module for (provisioner/clouds/), each with the options it
# cannot do without (docs/clouds.md says what each is; EC2's keys come from the environment).
DRIVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "ec2": ("instance_type", "image"),
    "gce": ("instance_type", "image", "project", "user_id", "key"),
    "azure_arm": ("instance_type", "image", "tenant_id", "subscription_id", "key", "secret",
                  "resource_group", "network"),
    "openstack": ("instance_type", "image", "auth_url", "user", "password", "tenant"),
}


@dataclass(frozen=True)
class Provider:
    """Where nodes come from: `driver` is `local`, `byo` (own machines that join with a
    token; never booted or destroyed by us) or a libcloud provider of DRIVER_OPTIONS, with
    its own `options` (ec2: instance_type, image, spot, endpoint; docs/clouds.md). With
    `spot = true` it also offers spot machines at `spot_price_per_hour` (default: the
    on-demand price), which the policy may boot and the provider may take back."""

    name: str
    price_per_hour: Decimal
    billing_increment_s: int
    boot_s: float
    driver: str = "local"
    options: Mapping[str, Any] = field(default_factory=dict)
    spot_price_per_hour: Decimal | None = None

    @property
    def bootable(self) -> bool:
        """The control plane can create (and destroy) this provider's machines."""
        return self.driver != "byo"

    @property
    def spot(self) -> bool:
        """The provider offers spot machines (besides on-demand ones)."""
        return bool(self.options.get("spot", False))

    @property
    def spot_price(self) -> Decimal:
        return self.price_per_hour if self.spot_price_per_hour is None else self.spot_price_per_hour


@dataclass(frozen=True)
class Model:
    """A model the config ships: its package directory (model.toml and code), registered as
    its first version when the control plane starts on an empty state."""

    name: str
    package: Path
    streams_per_gpu: int = 4
    version: str = "1"


# A node streaming (or owing usage) without a control plane keeps going this long, then
# exits; the reaper takes silence for death only while heartbeats can arrive, or after this.
ORPHAN_SERVING_S = 3600.0
# A user recalled to the nearest region once it serves again (it was down when the user was
# placed elsewhere) streams on where it is for up to this long while the page gets a node
# there, which may have to boot (make-before-break); then that old stream closes.
RECALL_MOVE_S = 300.0


@dataclass(frozen=True)
class Config:
    regions: tuple[Region, ...]
    providers: tuple[Provider, ...]
    models: tuple[Model, ...]
    redis_url: str | None = None   # redis://..., or sentinel://HOST:PORT;sentinel://... (HA)
    redis_master: str = "voice"    # the primary's name the sentinels know (sentinel:// only)
    database_url: str = DEFAULT_DATABASE_URL
    model_load_s: float = 10.0
    # Where model packages are kept, by digest: a directory, or s3://bucket/prefix?endpoint_url=
    package_store: str = str(ROOT / "var" / "packages")
    crash_rate: float = 0.0
    ticket_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    # Signs the page's uid cookies and user tokens (USER_TOKEN_SECRET); local: random.
    user_token_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    admin_token: str = field(default="", repr=False)   # operators' bearer token; "" = none
    dev_users: bool = False         # VOICE_DEV_USERS=1: any ?user= is taken at its word
    # Waiting users with only the page's cookie (anonymous) count as demand the autoscaler
    # boots nodes for; off (deploy.toml): they get free capacity only. Token users always do.
    anonymous_demand_scales: bool = True
    deployed: bool = False          # started by a deployment entry point (see load_config)
    aws_access_key_id: str = field(default="", repr=False)
    aws_secret_access_key: str = field(default="", repr=False)
    heartbeat_interval_s: float = 2.0
    ticket_ttl_s: float = 60.0
    latency_budget_ms: float = 60.0
    drain_limit_s: float = 600.0
    idle_grace_s: float = 60.0
    arrival_tau_s: float = 600.0    # the arrival-rate average the warm buffer is sized from
    public_url: str = "http://127.0.0.1:8000"   # where nodes join and heartbeat (VOICE_PUBLIC_URL)
    node_ca_file: str = ""          # CA bundle for nodes' own https certificates (or system)
    node_package: str = "voicechanger"   # what a fresh VM pip-installs to get `voicectl`
    cluster: str = "voice"          # tags every VM we make; we touch no VM without it
    join_token_ttl_s: float = 3600.0  # a cloud node's one-time join token lives this long
    constrained_cooloff_s: float = 120.0  # a pool refused for capacity is avoided this long
    # The lobby's front door (docs/architecture.md, "Limits at the front door"): lobby
    # attempts per user and per client address per window, refilled evenly, at most `burst`
    # at once (0: no limit); lobby sockets one client may hold open in one webapp process.
    lobby_attempts_per_user: int = 20
    lobby_attempts_per_client: int = 60
    lobby_attempts_window_s: float = 60.0
    lobby_attempts_burst: int = 10   # at once, of either (0: the whole window's)
    lobby_sockets_per_client: int = 32
    trusted_proxies: int = 0        # proxies whose X-Forwarded-For entry to believe (0: none)
    lobby_limit_exempt: tuple[str, ...] = ()   # addresses or networks no limit applies to
    # What a node may announce as its URL (the control plane pushes orders to it): these
    # schemes, and these ports (empty: any; a deployment names its nodes' port).
    node_url_schemes: tuple[str, ...] = ("ws", "wss")
    node_url_ports: tuple[int, ...] = ()

    @property
    def heartbeat_timeout_s(self) -> float:
        """No heartbeat for this long means the node is dead (three missed beats)."""
        return 3 * self.heartbeat_interval_s

    def model(self, name: str) -> Model | None:
        """The configured model called `name`, or None."""
        return next((m for m in self.models if m.name == name), None)

    def streams_per_gpu(self, model: str) -> int:
        """Streams one node of a configured model serves (4 for one the config lacks)."""
        m = self.model(model)
        return m.streams_per_gpu if m else 4

    def region(self, name: str) -> Region | None:
        return next((r for r in self.regions if r.name == name), None)

    def provider(self, name: str) -> Provider:
        found = next((p for p in self.providers if p.name == name), None)
        if found is None:
            raise ConfigError(f"no provider {name!r} in the config; known: "
                              f"{[p.name for p in self.providers]}")
        return found

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **changes)


def _float(environ: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a number; set it to a number "
                          f"between {lo} and {hi} or unset it") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={raw!r} is out of range; expected {lo}..{hi}")
    return value


def _decimal(raw: object, where: str) -> Decimal:
    try:
        return Decimal(str(raw))
    except InvalidOperation:
        raise ConfigError(f"{where}={raw!r} is not a decimal price such as \"1.10\"") from None


_PROVIDER_KEYS = ("price_per_hour", "billing_increment_s", "boot_s", "driver",
                  "spot_price_per_hour")


def _need(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where} has no {key!r}; add it to the config file")
    return table[key]


def parse_config(doc: Mapping[str, Any], source: str = "config") -> Config:
    """Build a Config from a parsed TOML document (environment knobs are applied later)."""
    settings = doc.get("settings", {})
    providers = tuple(
        Provider(
            name=name,
            price_per_hour=_decimal(_need(p, "price_per_hour", f"{source} [providers.{name}]"),
                                    f"providers.{name}.price_per_hour"),
            billing_increment_s=int(p.get("billing_increment_s", 1)),
            boot_s=float(p.get("boot_s", 60.0)),
            driver=str(p.get("driver", "local")),
            options={k: v for k, v in p.items() if k not in _PROVIDER_KEYS},
            spot_price_per_hour=(_decimal(p["spot_price_per_hour"],
                                          f"providers.{name}.spot_price_per_hour")
                                 if "spot_price_per_hour" in p else None),
        )
        for name, p in doc.get("providers", {}).items()
    )
    regions = tuple(
        Region(name=str(_need(r, "name", f"{source} [[regions]]")),
               provider=str(_need(r, "provider", f"{source} region")),
               lat=float(_need(r, "lat", f"{source} region")),
               lon=float(_need(r, "lon", f"{source} region")),
               provider_region=str(r.get("provider_region", "")),
               max_nodes=int(r["max_nodes"]) if "max_nodes" in r else None,
               beacon_url=str(r.get("beacon_url", "")),
               beacon_delay_ms=min(5000.0, max(0.0, float(r.get("beacon_delay_ms", 0.0)))))
        for r in doc.get("regions", [])
    )
    models = tuple(_model(m, source) for m in doc.get("models", []))
    if not regions or not models:
        raise ConfigError(f"{source} needs at least one [[regions]] and one [[models]] entry")
    known = {p.name for p in providers}
    for r in regions:
        if r.provider not in known:
            raise ConfigError(f"region {r.name!r} uses provider {r.provider!r}, which has no "
                              f"[providers.{r.provider}] table in {source}")
    for p in providers:
        if p.driver not in (*DRIVERS_OF_OUR_OWN, *DRIVER_OPTIONS):
            raise ConfigError(f"[providers.{p.name}] in {source}: driver {p.driver!r} is none "
                              f"of {[*DRIVERS_OF_OUR_OWN, *DRIVER_OPTIONS]}; another cloud "
                              "needs its module in provisioner/clouds/")
        for key in DRIVER_OPTIONS.get(p.driver, ()):
            _need(p.options, key, f"{source} [providers.{p.name}] (driver {p.driver})")
        if p.spot and p.driver in ("azure_arm", "openstack"):
            raise ConfigError(f"[providers.{p.name}] in {source}: driver {p.driver} makes no "
                              "spot machines; remove `spot = true`")
        port = p.options.get("node_port", NODE_PORT)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"[providers.{p.name}] node_port {port!r} in {source} must be a "
                              "port number 0-65535 (0: any free port, for dev clouds)")
    for name in [m.name for m in models] + [r.name for r in regions]:
        if not NAME_RE.match(name):
            raise ConfigError(f"name {name!r} in {source} must be 1-64 of [A-Za-z0-9_.-]")
    unknown = set(settings) - set(Config.__dataclass_fields__) - {"regions", "providers",
                                                                   "models", "deployed"}
    if unknown:
        raise ConfigError(f"unknown [settings] keys {sorted(unknown)} in {source}")
    flag = settings.get("anonymous_demand_scales", True)
    if not isinstance(flag, bool):
        raise ConfigError(f"anonymous_demand_scales = {flag!r} in {source} must be true or false")
    settings = {**settings, **_front_door(settings, source), **_node_urls(settings, source)}
    return Config(regions=regions, providers=providers, models=models, **settings)


def _model(table: Mapping[str, Any], source: str) -> Model:
    """A `[[models]]` entry: `package = "models/miku"` (relative to the project root)."""
    raw = str(_need(table, "package", f"{source} [[models]]"))
    if set(table) - {"package"}:
        raise ConfigError(f"[[models]] {raw!r} in {source}: only `package` is read; a "
                          "model's name and params live in its model.toml")
    path = Path(raw) if Path(raw).is_absolute() else ROOT / raw
    try:
        manifest = load_manifest(path)
    except PackageError as e:
        raise ConfigError(f"[[models]] package {raw!r} in {source}: {e}") from None
    return Model(manifest.name, path, manifest.streams_per_gpu)


def _node_urls(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    schemes = settings.get("node_url_schemes", ["ws", "wss"])
    if not isinstance(schemes, list) or not schemes or set(schemes) - {"ws", "wss"}:
        raise ConfigError(f"node_url_schemes = {schemes!r} in {source} must list \"ws\", "
                          "\"wss\" or both")
    ports = settings.get("node_url_ports", [])
    if not isinstance(ports, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise ConfigError(f"node_url_ports = {ports!r} in {source} must list port numbers "
                          "1-65535 (empty: any)")
    if "node_url_schemes" in settings:
        out["node_url_schemes"] = tuple(schemes)
    if "node_url_ports" in settings:
        out["node_url_ports"] = tuple(ports)
    return out


def _front_door(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The front door's settings, checked: a typo in an exempt network must not start a
    webapp that limits nobody, or everybody."""
    out: dict[str, Any] = {}
    for key in ("lobby_attempts_per_user", "lobby_attempts_per_client", "lobby_attempts_burst",
                "lobby_sockets_per_client", "trusted_proxies"):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} = {value!r} in {source} must be a whole number "
                                  "0 or more (0: no limit / no proxy)")
    for key in ("lobby_attempts_window_s",):
        value = settings.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key} = {value!r} in {source} must be a number above 0")
        if key in settings:
            out[key] = float(value)
    exempt = settings.get("lobby_limit_exempt", ())
    if not isinstance(exempt, list | tuple):
        raise ConfigError(f"lobby_limit_exempt = {exempt!r} in {source} must be a list of "
                          'addresses or networks, such as ["127.0.0.1", "10.0.0.0/8"]')
    for net in exempt:
        try:
            ipaddress.ip_network(str(net), strict=False)
        except ValueError:
            raise ConfigError(f"lobby_limit_exempt entry {net!r} in {source} is not an IP "
                              'address or network such as "127.0.0.1" or "10.0.0.0/8"') from None
    if "lobby_limit_exempt" in settings:
        out["lobby_limit_exempt"] = tuple(str(net) for net in exempt)
    return out


def load_config(environ: Mapping[str, str] | None = None, deployed: bool = False) -> Config:
    """Read VOICE_CONFIG (or the default file) and apply the environment knobs.

    `deployed`: a deployment's entry point (gunicorn's `webapp.wsgi`, the Celery worker and
    beat) is starting, so every shared value must be given (common.deployment), not made up."""
    env = os.environ if environ is None else environ
    if deployed:
        check_deployment(env)
    path = Path(env.get("VOICE_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"VOICE_CONFIG={str(path)!r} does not exist; point it at a TOML "
                          f"file like {DEFAULT_CONFIG_PATH}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    cfg = parse_config(doc, str(path))
    changes: dict[str, Any] = {
        "redis_url": env.get("REDIS_URL") or None,
        "redis_master": env.get("REDIS_MASTER") or cfg.redis_master,
        "model_load_s": _float(env, "MODEL_LOAD_SECONDS", cfg.model_load_s, 0.0, 3600.0),
        "crash_rate": _float(env, "CRASH_RATE", cfg.crash_rate, 0.0, 1.0),
    }
    if env.get("DATABASE_URL"):
        changes["database_url"] = env["DATABASE_URL"]
    if env.get("VOICE_PACKAGE_STORE"):
        changes["package_store"] = env["VOICE_PACKAGE_STORE"]
    if env.get("VOICE_PUBLIC_URL"):
        changes["public_url"] = env["VOICE_PUBLIC_URL"].rstrip("/")
    if env.get("VOICE_EC2_ENDPOINT"):   # dev and tests: every ec2 provider talks to moto
        changes["providers"] = tuple(
            replace(p, options={**p.options, "endpoint": env["VOICE_EC2_ENDPOINT"]})
            if p.driver == "ec2" else p for p in cfg.providers)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if env.get(key):
            changes[key.lower()] = env[key]
    if env.get("TICKET_SECRET"):
        changes["ticket_secret"] = env["TICKET_SECRET"]
    if env.get("USER_TOKEN_SECRET"):
        changes["user_token_secret"] = env["USER_TOKEN_SECRET"]
    changes["admin_token"] = env.get("VOICE_ADMIN_TOKEN", "")
    changes["dev_users"] = env.get("VOICE_DEV_USERS", "") == "1"
    return replace(cfg, deployed=deployed, **changes)
