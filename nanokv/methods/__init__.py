"""KV-cache compression methods, one file each. `full` keeps every token (no compression)."""

METHODS = ("full",)


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return name
