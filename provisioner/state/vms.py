"""The local cloud driver's VMs (pid, name, region, image)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import VMS, vm_key


class LocalVMs(StateBase):
    """State's verbs on the local cloud driver's VMs (a mixin)."""

    def save_vm(self, vm_id: str, fields: Mapping[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(VMS, vm_id)
        pipe.hset(vm_key(vm_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def vms(self) -> list[dict[str, str]]:
        ids = sorted(self.r.smembers(VMS))
        pipe = self.r.pipeline(transaction=False)
        for vm_id in ids:
            pipe.hgetall(vm_key(vm_id))
        return [dict(h) for h in pipe.execute() if h]

    def forget_vm(self, vm_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(VMS, vm_id)
        pipe.delete(vm_key(vm_id))
        pipe.execute()
