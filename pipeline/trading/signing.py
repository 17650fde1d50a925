"""Order requests signed by the strategy that issued them, and the keys to check them.

A request's signature is the hex HMAC-SHA256, with the strategy's own key, of its
*canonical encoding*: every field but ``signature`` as compact JSON with sorted keys
(ASCII only). Execution recomputes it, so a request with any field changed, or signed with
another key, is refused. Fields added to ``OrderRequest`` later (``action``,
``target_client_order_id``) are left out while they hold their defaults, so a request
signed before they existed, read with the newer schema, still verifies.

Keys never appear in logs, topics or the repo. They come from the environment
(``PIPELINE_STRATEGY_KEY_<ID>``, the id upper-cased with other characters as ``_``) or
from a JSON file ``{"strategy_id": "secret"}`` readable only by its owner.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.errors import PipelineError
from pipeline.core.vocabulary import OrderAction

ENV_PREFIX = "PIPELINE_STRATEGY_KEY_"
MAX_ID_PREFIX = 15  # + "-" + 20 hex digits = Gemini's 36 characters
_ID_UNSAFE = re.compile(r"[^:\-_.#a-zA-Z0-9]")


# Fields added after the first OrderRequest schema, with the default a reader fills in.
_ADDED_DEFAULTS = {"action": OrderAction.NEW.value, "target_client_order_id": None}


def canonical(request: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: all fields except ``signature`` (and the later fields
    at their defaults)."""
    fields = {k: v for k, v in request.items() if k != "signature"
              and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(request: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(request), hashlib.sha256).hexdigest()


def verify(request: Mapping[str, Any], key: bytes) -> bool:
    """True if ``request["signature"]`` is this key's signature of the request."""
    signature = request.get("signature")
    # compare_digest raises TypeError on a str that is not ASCII: such a one is no hex digest
    return isinstance(signature, str) and signature.isascii() and \
        hmac.compare_digest(sign(request, key), signature)


def client_order_id(strategy_id: str, trigger: str, index: int = 0) -> str:
    """Deterministic id from the strategy and the input that caused the order (e.g.
    ``topic/partition/offset``) and the order's position among that input's intents, so
    reprocessing the same input yields the same id and execution can refuse a repeat.

    Always Gemini-valid (``[:\\-_.#a-zA-Z0-9]{1,36}``), whatever the strategy id: the
    prefix is the strategy id with other characters as ``_``, cut to 15 characters, then
    ``-`` and 20 hex digits of a digest that covers the *whole* strategy id, so two long
    ids with the same first 15 characters still make different order ids. A strategy id
    that is already valid and at most 15 characters keeps the ids it always had."""
    digest = hashlib.sha256(f"{strategy_id}\x1f{trigger}\x1f{index}".encode()).hexdigest()
    prefix = _ID_UNSAFE.sub("_", strategy_id)[:MAX_ID_PREFIX]
    return f"{prefix}-{digest[:20]}"


def env_name(strategy_id: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", strategy_id).upper()


class StrategyKeys:
    """Signing keys per strategy id, from a key file and/or the environment."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = dict(keys)

    @classmethod
    def load(cls, key_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None) -> "StrategyKeys":
        keys: dict[str, bytes] = {}
        if key_file is not None:
            keys.update(read_key_file(Path(key_file)))
        env = os.environ if environ is None else environ
        for name, value in env.items():
            if name.startswith(ENV_PREFIX) and value:
                keys[name] = value.encode()  # looked up by env_name(strategy_id)
        return cls(keys)

    def key(self, strategy_id: str) -> bytes | None:
        return self._keys.get(strategy_id) or self._keys.get(env_name(strategy_id))

    def __repr__(self) -> str:  # never show the secrets
        return f"StrategyKeys({len(self._keys)} key(s))"


def read_private_json(path: Path, what: str) -> object:
    """The JSON in a secrets file (``what``: "key file", "API key file"), refused unless
    only its owner can read it: a secret others can read is no longer a secret."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise PipelineError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PipelineError(f"{what} {path} is readable by others (mode "
                            f"{stat.S_IMODE(mode):04o}): `chmod 600 {path}` first")
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise PipelineError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise PipelineError(f"{what} {path} is not JSON: {getattr(exc, 'msg', exc)}") from None


def read_key_file(path: Path) -> dict[str, bytes]:
    """``{"strategy_id": "secret"}`` from a file only its owner can read."""
    data = read_private_json(path, "key file")
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise PipelineError(f"key file {path} must be a JSON object of strategy id -> secret")
    return {str(k): v.encode() for k, v in data.items()}
