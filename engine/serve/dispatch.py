"""Which queued request runs next, and on which free model group: arrival order, bent only to save
LoRA switches, within a bound.

Every group holds one set of named adapters fused into its weights (`Group.fused`: () for none); a
request names the set it needs (`Job.lora_key`). Switching costs a host-to-device copy of the touched
weights and the ΔW products on every rank (engine/lora.py), so a free group prefers a request it can
run without one. The rule, for the oldest queued request (the head):

1. a free group that already holds the head's set runs the head;
2. else a free group runs the oldest request whose set it holds — passing over the requests queued
   before it, each of which counts one pass — but never past a request already passed over
   `max_passes` times;
3. else the head runs on a free group, which switches: the free group whose set the fewest queued
   requests need.

So a request waits at most `max_passes` requests more than arrival order would make it wait, and a free
group never idles while requests are queued. `max_passes` 0 is strict arrival order.
"""

from __future__ import annotations


def pick(queued: list, free: list, max_passes: int):
    """(job, group) to run next, or None; `queued` in arrival order, `free` the groups that can take a
    job now. Counts the passes of the jobs passed over (`job.passed`)."""
    if not queued or not free:
        return None
    head = queued[0]
    for group in free:
        if group.fused == head.lora_key:
            return head, group
    for group in free:
        for i, job in enumerate(queued):
            if job.lora_key == group.fused:
                for older in queued[:i]:
                    older.passed += 1
                return job, group
            if job.passed >= max_passes:
                break
    wanted = {}
    for job in queued:
        wanted[job.lora_key] = wanted.get(job.lora_key, 0) + 1
    return head, min(free, key=lambda g: wanted.get(g.fused, 0))
