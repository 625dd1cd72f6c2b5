"""Build a typed config dataclass from a plain dict (YAML, JSON, serveConfigV2)."""
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
