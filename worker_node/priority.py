"""The audio thread's priority: real-time round-robin where the process may ask for it."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("worker_node")

# The audio thread asks for real-time round-robin scheduling at a low priority, as
# PipeWire's and JACK's audio threads do: a socket's wake-up then preempts every ordinary
# process on the machine (an own GPU machine runs its owner's programs beside the node).
# The loop sleeps in select between frames and uses a few % of a core, and the kernel caps
# real-time threads at 95% of each period, so a runaway could not freeze the machine.
# Measured on the shared 2-core machine under a test run's load, 8 s of 4 streams, client
# at real-time priority: 4-stream p99/p50 1.5-1.6 with the node at nice -11, 1.7-1.8 with
# SCHED_RR (client at normal priority: 4.8-9.9 with nice -11, 2.1-2.9 with SCHED_RR).
# Without CAP_SYS_NICE the thread falls back to nice -11 (PulseAudio's level), then to 0.
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
