"""Attribution methods: one module per method, all behind ``Attributor`` and one registry.

Modules in this package are discovered automatically; a new method registers itself with
``@register`` and appears in the CLI, the UI and the benchmark.
"""
from engine.methods.base import (
    SIGN_CONVENTION,
    Attributor,
    Queries,
    coerce_settings,
    describe_settings,
    get_method,
    list_methods,
    register,
    settings_dict,
)

__all__ = ["Attributor", "Queries", "register", "get_method", "list_methods", "coerce_settings", "describe_settings",
           "settings_dict", "SIGN_CONVENTION"]
