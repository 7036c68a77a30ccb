"""What a failed Ray call means for the fleet, read from the exception alone (no state): whether the call
raised (the work is broken, its process is fine), poisoned its process's CUDA context, or lost its process;
and one line on why, for logs and error rows."""
from __future__ import annotations

import collections
import re

import ray

from .errors import DeviceFault

RAISED, FAULT, DIED = "raised", "fault", "died"


def classify(e: Exception, *, starting: bool = False) -> tuple[str, str]:
    """(what happened, why) for a failed call. ``FAULT``: it raised a sticky CUDA error (``DeviceFault``), the
    process is unusable; ``RAISED``: it raised, the work is broken and the process fine; ``DIED``: its process
    died (killed, crashed, OOM-killed, node lost) or Ray lost it. ``starting``: the call was an actor's first
    (``info()``/``ready()``): ``RAISED`` when its constructor raised, else ``DIED``."""
    reason = reason_of(e)
    if starting:
        raised = isinstance(e, ray.exceptions.RayActorError) and constructor_error(e)
        return (RAISED if raised else DIED), reason
    if isinstance(getattr(e, "cause", None), DeviceFault):
        return FAULT, reason
    if isinstance(e, ray.exceptions.RayTaskError):
        return RAISED, reason
    return DIED, reason


def reason_of(e: Exception) -> str:
    """One line on why a Ray call failed, for logs and error rows."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        return f"{type(cause).__name__}: {cause}"
    if isinstance(e, ray.exceptions.RayActorError):
        return constructor_error(e) or f"actor died: {type(e).__name__}{death_cause(e)}"
    # lost object, dead node, Ray's memory monitor: the actor is dropped and the work retried elsewhere
    return f"ray failure: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def died(e: Exception) -> bool:
    """The actor's process died (killed, crashed, node lost), as opposed to its constructor raising."""
    return isinstance(e, ray.exceptions.RayActorError) and not constructor_error(e)


def death_cause(e: ray.exceptions.RayActorError) -> str:
    """" (<why>)" from Ray's "The actor is dead because <why>" line (killed by ray.kill, its worker process
    died and how, its node died), without Ray's list of common causes; "" when it gives none."""
    for line in str(e).splitlines():
        if line.startswith("The actor is dead because "):
            why = line[len("The actor is dead because "):].split(" Some common causes")[0].strip()
            return f" ({why[:200]})" if why else ""
    return ""


def constructor_error(e: ray.exceptions.RayActorError) -> str | None:
    """``Type: message`` of what the actor's constructor raised, when that is why the actor died.

    Ray 2.x marks such a death ``actor_init_failed`` and keeps the creation task's error only
    as its formatted traceback in the message; some releases also keep it in ``cause``.
    """
    cause = getattr(e, "cause", None)
    if isinstance(cause, ray.exceptions.RayTaskError):
        return reason_of(cause)
    if not getattr(e, "actor_init_failed", False):
        return None
    lines = str(e).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    # a traceback ends with the exception: the unindented lines after the last frame
    first = frames[-1] + 1 if frames else len(lines) - 1
    return " ".join(line for line in lines[first:] if line and not line.startswith(" "))[:300] or None


def node_of(e: Exception) -> str:
    """The node address a Ray error names ("... pid=12, ip=10.0.0.5, ..." or "ip: 10.0.0.5"), else ""."""
    m = re.search(r"\bip(?:=|: )([0-9A-Fa-f.:]+)", str(e))
    return m.group(1).rstrip(":") if m else ""


def per_node(failures: list[tuple[str, str]]) -> list[str]:
    """Actors that did not start, one line per node (those never placed on one last) with each reason once."""
    nodes: dict[str, list[str]] = collections.defaultdict(list)
    for node, reason in sorted(failures, key=lambda f: not f[0]):
        nodes[node].append(reason)
    return [f"{'node ' + node if node else 'not placed'}: {len(why)} device actor{'s' * (len(why) > 1)} "
            f"did not start: {'; '.join(dict.fromkeys(why))}" for node, why in nodes.items()]
