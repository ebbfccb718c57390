"""The ``manager.conf`` write class each AMI action needs, as Asterisk registers it.

One table for the three places that must agree: the gateway names the class in a "Permission denied"
error, the simulator refuses an action its user lacks the class for, and the doctor tells the
administrator which class to add. Asterisk accepts any one of an action's classes; the first listed
is the one to grant (the narrowest of them, and the one CMS's documented user ``call,agent,originate``
already has where it has any).

Sources: the modules' own registrations (manager.c for most actions; app_queue.c, app_senddtmf.c,
res_parking, chan_sip and res_pjsip_notify for theirs).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["WRITE_CLASSES", "write_classes"]

#: lower-case action name -> the write classes Asterisk accepts for it (any one); () = none needed
WRITE_CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "originate": ("originate",),
        "hangup": ("call", "system"),
        "redirect": ("call",),
        "blindtransfer": ("call",),
        "atxfer": ("call",),
        "cancelatxfer": ("call",),
        "park": ("call",),
        "bridge": ("call",),
        "playdtmf": ("call",),
        "setvar": ("call",),
        "getvar": ("call", "reporting"),
        "status": ("call", "reporting", "system"),
        "coreshowchannels": ("system", "reporting"),
        "dbget": ("system", "reporting"),
        "dbput": ("system",),
        "dbdel": ("system",),
        "filter": ("system",),
        "sipnotify": ("system",),
        "pjsipnotify": ("system",),
        "queuepause": ("agent",),
        "queueadd": ("agent",),
        "queueremove": ("agent",),
        "queuestatus": (),
        "queuesummary": (),
        "command": ("command",),
        "ping": (),
        "events": (),
    }
)


def write_classes(action: str) -> tuple[str, ...]:
    """The classes ``action`` may be sent with (any one); raises ``KeyError`` for an action not in the table."""
    return WRITE_CLASSES[action.lower()]

