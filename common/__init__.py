"""Shared by every package: the configuration object and signed tickets."""

from common.config import Config, Model, Provider, Region, load_config
from common.errors import ConfigError, TicketError, VoiceError

__all__ = [
    "Config", "ConfigError", "Model", "Provider", "Region", "TicketError", "VoiceError",
    "load_config",
]
