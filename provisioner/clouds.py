"""Every cloud through libcloud: our `local` driver is registered beside libcloud's own.

`driver_for(cfg, provider)` returns a driver for a provider named in the config. Production
names a libcloud provider (EC2, GCE, Azure) there with its credentials; nothing else changes.
"""

from __future__ import annotations

from functools import lru_cache

from libcloud.compute.base import NodeDriver, NodeImage, NodeLocation
from libcloud.compute.providers import get_driver, set_driver

from common.config import Config, Model
from common.errors import ConfigError

LOCAL = "voice-local"


def register() -> None:
    """Register our drivers with libcloud once (set_driver raises on a second call)."""
    try:
        get_driver(LOCAL)
    except AttributeError:
        set_driver(LOCAL, "provisioner.local_driver", "LocalNodeDriver")


@lru_cache(maxsize=32)
def _driver(redis_url: str, provider: str, boot_s: float, price: float,
            env: tuple[tuple[str, str], ...]) -> NodeDriver:
    register()
    if provider != "local":
        raise ConfigError(f"provider {provider!r} has no driver wired yet; the local run "
                          "uses provider = \"local\" (see docs/architecture.md)")
    return get_driver(LOCAL)(redis_url, env=dict(env), boot_s=boot_s, price_per_hour=price)


def driver_for(cfg: Config, provider: str) -> NodeDriver:
    p = cfg.provider(provider)
    assert cfg.redis_url, "the control plane needs REDIS_URL"
    env = (("TICKET_SECRET", cfg.ticket_secret), ("MODEL_LOAD_SECONDS", str(cfg.model_load_s)),
           ("CRASH_RATE", str(cfg.crash_rate)))
    return _driver(cfg.redis_url, provider, p.boot_s, float(p.price_per_hour), env)


def image_for(driver: NodeDriver, model: Model) -> NodeImage:
    return NodeImage(f"{model.name}:{model.version}:{model.semitones:g}",
                     f"{model.name} v{model.version}", driver)


def location_for(driver: NodeDriver, region: str) -> NodeLocation:
    return NodeLocation(region, region, "", driver)
