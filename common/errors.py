"""The exception tree shared by every package: one root, one class per kind of failure."""


class VoiceError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(VoiceError):
    """The config file or an environment knob is malformed; the message names the value."""


class TicketError(VoiceError):
    """A stream ticket is malformed, forged, expired or meant for another node or model."""


class JoinError(VoiceError):
    """A node's join or heartbeat is refused: unknown, used or expired join token, revoked
    or unknown credential, or a node the control plane already forgot."""


class CapacityError(VoiceError):
    """A cloud refused to create a machine for capacity or quota; the provisioner fails
    over to the next cheapest pool and avoids this one for a cool-off."""
