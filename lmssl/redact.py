"""The one scrubber: credentials never reach a file lmssl writes (stage.json, model cards, the summary, the
Hub card) nor what it prints. A value is hidden when its key looks like a credential, at any depth, when it
sits in a mapping of storage or HTTP credentials, or when the value itself has a credential's shape."""

from __future__ import annotations

import re
from typing import Any

HIDDEN = "<hidden>"
# Key shapes (lowercased, '-' read as '_'): *_token and token (hf_token, access_token; not tokenizer_from,
# pad_token_id or max_tokens),
# *secret*, *password*, *api_key*, authorization, aws_*, credentials, private or access keys, connection strings.
SECRET_KEY = re.compile(r"(^|_)token$|secret|passw(or)?d|api_?key|authorization|^aws_|credential"
                        r"|private_key|access_key|account_key|session_key|(^|_)sas(_|$)|connection_string|cookie")
# Mappings whose every entry may be a credential by another name (s3fs's `key`, gcsfs's `token`, ...).
CREDENTIAL_MAPPINGS = re.compile(r"storage_options|headers|client_kwargs|credentials")
# Values that are credentials whatever their key: Hugging Face, GitHub, OpenAI-style and AWS key ids,
# HTTP bearer and basic credentials, URLs with a password.
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{20,}"
                          r"|\bAKIA[0-9A-Z]{16}\b|\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")


def secret_key(key: Any) -> bool:
    """Whether a mapping key names a credential."""
    return bool(SECRET_KEY.search(str(key).lower().replace("-", "_")))


def redact(value: Any, within_credentials: bool = False) -> Any:
    """A copy of `value` (mappings, lists, strings, at any depth) with every credential replaced by <hidden>."""
    if isinstance(value, dict):
        return {k: HIDDEN if (within_credentials or secret_key(k)) and v not in (None, "", {}, [])
                else redact(v, bool(CREDENTIAL_MAPPINGS.search(str(k).lower()))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, within_credentials) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """`text` with every credential-shaped substring hidden (for messages and free text)."""
    return SECRET_VALUE.sub(HIDDEN, text)
