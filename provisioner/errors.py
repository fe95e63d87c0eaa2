"""Errors the provisioner raises on purpose; every one is a `common.errors.VoiceError`."""

from __future__ import annotations

from common.errors import VoiceError


class CapacityError(VoiceError):
    """A cloud refused to create a VM for capacity or quota (EC2: InsufficientInstanceCapacity,
    InstanceLimitExceeded, VcpuLimitExceeded, SpotMaxPriceTooLow, ...): nothing was created.
    The message names the provider region, the instance type and the cloud's own words; the
    caller tries another region, instance type or on-demand instead of retrying here at once.
    """

    def __init__(self, message: str, *, provider_region: str, instance_type: str,
                 code: str) -> None:
        super().__init__(message)
        self.provider_region = provider_region
        self.instance_type = instance_type
        self.code = code


class JoinError(VoiceError):
    """A node's join or heartbeat is refused: an unknown, used or expired join token, a
    revoked or unknown credential, or a node the control plane already forgot."""


class BadReport(VoiceError, ValueError):
    """A node's join request or heartbeat report is malformed (not a JSON object, a bad
    state, a name outside [A-Za-z0-9_.-], a row of the wrong shape, a number out of range);
    the message names the field and what was expected. The node endpoints answer 400."""
