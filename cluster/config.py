"""Build a typed config dataclass from a plain dict (YAML, JSON, serveConfigV2); the int check every
config and record validator shares."""
from __future__ import annotations

import dataclasses


def config_from_dict(cls, d: dict):
    """cls(**d), refusing a key cls does not have with a message that names it:
    a misspelled key must fail loudly, not fall back to a default."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise ValueError(f"unknown {cls.__name__} key {key!r} (known: {', '.join(sorted(known))})")
    return cls(**d)


def is_int(v) -> bool:
    """An int that is not a bool (True would pass isinstance(v, int) and count as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)
