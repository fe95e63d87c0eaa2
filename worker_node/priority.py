"""The audio thread's priority: real-time round-robin where the process may ask for it.

At a low SCHED_RR priority, as PipeWire's and JACK's audio threads run, a socket's wake-up
preempts every ordinary process on the machine (an own GPU machine runs its owner's programs
beside the node); bench/audio.py measures the round-trip tail it buys. The loop uses a few %
of a core and the kernel caps real-time threads at 95% of each period, so a runaway cannot
freeze the machine. Without CAP_SYS_NICE: nice -11 (PulseAudio's level), else normal.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("worker_node")

AUDIO_THREAD_RT_PRIORITY = 10
AUDIO_THREAD_NICE = -11


def raise_priority(thread_id: int) -> str:
    """Real-time scheduling for the audio thread where allowed, else a raised nice level."""
    try:
        os.sched_setscheduler(thread_id, os.SCHED_RR, os.sched_param(AUDIO_THREAD_RT_PRIORITY))
        return f"SCHED_RR {AUDIO_THREAD_RT_PRIORITY}"
    except OSError as e:
        refused = e
    try:
        os.setpriority(os.PRIO_PROCESS, thread_id, AUDIO_THREAD_NICE)
        log.info("audio thread at nice %d, not real-time (%s)", AUDIO_THREAD_NICE, refused)
        return f"nice {AUDIO_THREAD_NICE}"
    except OSError as e:   # no CAP_SYS_NICE: run at the normal priority
        log.info("audio thread at normal priority (%s); grant CAP_SYS_NICE for real-time "
                 "scheduling", e)
        return "normal"


def normal() -> None:
    """Back to the normal priority in a thread the audio thread starts (threads inherit
    their creator's scheduling): the agent's heartbeats are not audio."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass   # never raised, or not allowed to lower: stays as it is
