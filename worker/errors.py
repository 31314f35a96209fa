"""Named failures of a GetCallback request, so callers branch on types rather than strings.

Every error carries a short, secret-free `reason` fit for one log line. `retryable` tells the
scheduler whether the batch is simply due again (transport trouble, throttling, odd bodies) or the
whole account/OA should cool off (keys rejected, IP not whitelisted, account locked, OA problems).
"""

from __future__ import annotations


class ProviderError(Exception):
    """A GetCallback request that produced no usable answer. No message data may change."""

    retryable = True

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ProviderUnavailable(ProviderError):
    """Connection refused or reset, timeouts, HTTP 5xx: the provider is not answering right now."""


class MalformedResponse(ProviderError):
    """An answer that is not the documented JSON (HTML page, truncated body, wrong shape)."""


class RateLimited(ProviderError):
    """The provider says we are over its request rate (Code 160, or HTTP 429)."""


class ProviderRejected(ProviderError):
    """A documented non-success `Code` that retrying later may fix (99, 105, unknown codes)."""


class RefIdsNotFound(ProviderRejected):
    """Code 105, "SMSID not found": the answer covers the whole request, though one RefId the
    provider cannot find yet (new messages cannot be queried at once) may be the only cause."""


class AccountRejected(ProviderError):
    """The provider refuses the account itself (101 keys, 140 IP, 143 locked): cool off."""

    retryable = False


class OARejected(ProviderError):
    """The provider refuses the OA (204 unknown OAId, 799 OA inactive or not on the account)."""

    retryable = False
