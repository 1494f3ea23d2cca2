"""Tenants of ``vera-serve --tenants FILE``: API keys to tenant names, and each tenant's namespace in the bank.

A request carries ``Authorization: Bearer KEY``. The key is compared with every known key in constant time
(``hmac.compare_digest``, all of them, whatever matched), is never logged or echoed, and names one tenant,
whose tasks are the bank's ``<tenant>/<task>`` entries: it lists, runs, adds and removes those only, and
another tenant's task answers exactly as a missing one does.
"""

from __future__ import annotations

import hmac
import os

from ._errors import VeraError
from ._json import JsonError, load_file_bounded
from ._taskfile import is_task_name

MIN_KEY = 16  # characters: a key a person could guess is no key


class TenantsError(VeraError, ValueError):
    """A tenants file that is not a JSON object of API keys to tenant names."""


def read_tenants(path: str | os.PathLike) -> dict[str, str]:
    """``{API key: tenant}`` from ``path``, checked whole; the message never shows a key."""
    try:
        tenants = load_file_bounded(path)
    except (JsonError, OSError) as exc:
        raise TenantsError(f"{path} is not a readable tenants file ({exc}).") from exc
    if not isinstance(tenants, dict) or not tenants:
        raise TenantsError(f'{path}: expected a JSON object {{"API_KEY": "tenant", ...}} with at least one key.')
    for number, (key, tenant) in enumerate(tenants.items(), 1):
        if not isinstance(tenant, str) or not is_task_name(tenant):
            raise TenantsError(f"{path}: entry {number} names a tenant that is not 1-64 letters, digits, '_' or '-'.")
        if len(key) < MIN_KEY or not key.isprintable() or " " in key:
            raise TenantsError(f"{path}: the key of entry {number} ('{tenant}') is shorter than {MIN_KEY} characters"
                               " or holds spaces or control characters: use a long random key.")
    return tenants


class Tenants:
    """Who a request's ``Authorization`` header says it is."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of ``Bearer KEY``, or None (no header, another scheme, an unknown key)."""
        scheme, _, presented = (authorization or "").partition(" ")
        presented_bytes = presented.strip().encode()
        found = None
        for key, tenant in self._keys:  # every key, matched or not: the time does not say which one matched
            if hmac.compare_digest(key, presented_bytes) and scheme.lower() == "bearer":
                found = tenant
        return found


def namespaced(tenant: str | None, name: str) -> str | None:
    """The bank name of a tenant's task ``name`` (``name`` itself without tenants); None if not a task name."""
    if not isinstance(name, str) or not is_task_name(name):
        return None
    return f"{tenant}/{name}" if tenant else name
