"""The exception tree shared by every package: one root, one class per kind of failure."""


class VoiceError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(VoiceError):
    """The config file or an environment knob is malformed; the message names the value."""


class TicketError(VoiceError):
    """A stream ticket is malformed, forged, expired or meant for another node or model."""


class IdentityError(VoiceError):
    """A request's user cannot be trusted: no user, a forged or edited cookie, a bad or
    expired user token, or `?user=` without dev users. The message says how to authenticate."""


class SchemaError(VoiceError):
    """The billing database is not at the schema revision this code needs (run
    `voicectl migrate`)."""


class PackageError(VoiceError):
    """A model package is malformed, fails its check, or does not match its digest; the
    message names what is wrong (the package's own error, where it raised one)."""
