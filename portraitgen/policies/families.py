"""The model families PortraitGen trains: family name -> the adapter class that implements it.

This table is the one registration of a family. Adding one means writing its adapter module here (a
:class:`~portraitgen.policies.base.FlowPolicy` subclass whose ``family`` is the name, with its tiny
builder for tests) and adding its line below; ``model.family``'s validation and JSON schema, the CLI's
``--family`` choices and the messages of :mod:`portraitgen.export` all read the table.

Nothing heavy is imported here (config validation and the workflow read it without torch); an
adapter's module is imported only when the family is used (:func:`portraitgen.policies.policy_classes`).
"""
from __future__ import annotations

FAMILIES: dict[str, str] = {  # name -> "<module in portraitgen.policies>:<class>"
    "sd3": ".sd3:SD3Policy",
    "flux": ".flux:FluxPolicy",
    "zimage": ".zimage:ZImagePolicy",
}

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def family_list(conjunction: str = "or") -> str:
    """``sd3, flux or zimage``: the families for messages."""
    names = list(FAMILY_NAMES)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"
