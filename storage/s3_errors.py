"""How the S3 backend treats a failed request: which errors are worth retrying (refused connections, timeouts, 5xx,
throttling) and which are the user's to fix (credentials, a missing bucket, an endpoint that never answered), said
in one line."""
from __future__ import annotations

from storage.errors import XvlmError

# Error codes of S3 and S3-compatible stores for credentials that are wrong, expired or not allowed.
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "InvalidClientTokenId", "Forbidden", "AllAccessDisabled", "AccountProblem",
              "403"}
RETRY_CODES = {"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable"}


class S3AccessError(XvlmError):
    """The store refused the credentials, has no such bucket, or cannot be reached: the message says what to check."""


class IncompleteRead(IOError):
    """The server closed a GET before the announced length."""


def split_s3(path: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not str(path).startswith("s3://"):
        raise ValueError(f"not an s3:// path: {path}")
    bucket, _, key = path[5:].partition("/")
    if not bucket:
        raise XvlmError(f"s3 path without a bucket: {path!r} (expected s3://bucket/prefix)")
    return bucket, key


def error_code(err: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of a botocore ClientError; ("", None) for anything else."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return "", None
    return str(response.get("Error", {}).get("Code", "")), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def access_error(err: BaseException, endpoint: str | None, path: str = "") -> str | None:
    """One line saying what to fix, for errors about credentials, buckets and endpoints (None for others)."""
    try:
        from botocore import exceptions as boto
    except ImportError:    # pragma: no cover - boto3 is a dependency
        return None
    endpoint = endpoint or "AWS's default endpoint"
    where = f" for {path}" if path else ""
    if isinstance(err, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return (f"no usable AWS credentials{where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                f"or give the machine a role)")
    if isinstance(err, boto.ClientError):
        code, status = error_code(err)
        bucket = split_s3(path)[0] if str(path).startswith("s3://") else \
            err.response.get("Error", {}).get("BucketName", "?")
        if code in AUTH_CODES or status == 403:
            return (f"S3 at {endpoint} refused the credentials{where} ({code or status}): check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE, and that they may use bucket {bucket!r}")
        if code == "NoSuchBucket":
            return (f"bucket {bucket!r} does not exist at {endpoint}: create it, or fix the s3:// path or the "
                    f"endpoint (--endpoint-url / AWS_ENDPOINT_URL)")
        if code in {"PermanentRedirect", "301", "AuthorizationHeaderMalformed"} or status == 301:
            return (f"bucket {bucket!r} is in another region than {endpoint} expects{where}: set AWS_DEFAULT_REGION "
                    f"or the endpoint")
        return None
    if isinstance(err, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ConnectionClosedError)):
        return (f"cannot reach the S3 endpoint {endpoint}{where} ({type(err).__name__}): check --endpoint-url / "
                f"AWS_ENDPOINT_URL and that the store is up")
    return None


def retryable(err: BaseException) -> bool:
    """Errors that a request (or a streaming read, reopened at its current byte) should retry."""
    from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, IncompleteReadError,
                                     ReadTimeoutError, ResponseStreamingError)
    from urllib3.exceptions import ProtocolError, ReadTimeoutError as U3ReadTimeout

    if isinstance(err, (BotoConnectionError, ReadTimeoutError, ProtocolError, U3ReadTimeout, ConnectionError,
                        TimeoutError, IncompleteRead, IncompleteReadError, ResponseStreamingError)):
        return True
    if isinstance(err, ClientError):
        code, status = error_code(err)
        return code in RETRY_CODES or (status or 0) >= 500
    return False


def is_missing(err: BaseException) -> bool:
    """A ClientError that says the object does not exist."""
    code, status = error_code(err)
    return status == 404 or code in {"404", "NoSuchKey", "NotFound"}


def is_precondition_failed(err: BaseException) -> bool:
    """A ClientError of a conditional PUT (If-None-Match: *) whose object already exists."""
    code, status = error_code(err)
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in (409, 412)
