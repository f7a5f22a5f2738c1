"""Errors a user can act on: what the CLI prints as one line instead of a traceback.

User errors (a bad job, bad input, storage the user cannot reach) exit 2; a run that started but
could not finish (`RunFailed`) exits 1 and says what to do. Storage errors name the URI and never
carry a credential: botocore's own messages do not, and `storage_error` scrubs the secret values
of the environment from whatever text it passes on.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")


class RunFailed(RuntimeError):
    """A run that stopped before finishing; the message says what to do next (exit 1)."""


class StorageError(OSError):
    """Storage that cannot be read or written; the message names the URI (exit 2)."""


def scrub(text: str) -> str:
    """`text` on one line, without the values of secret environment variables."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def storage_error(uri: str, e: BaseException) -> StorageError:
    """One line for an error of fsspec/s3fs/botocore on `uri`: what failed and what to check."""
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(e, StorageError):
        return e
    detail = scrub(str(e)) or type(e).__name__
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        what = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or an instance role)")
    elif isinstance(e, PermissionError):
        what = f"access denied ({detail}); check the credentials and the bucket's policy"
    elif isinstance(e, FileNotFoundError):
        what = f"not found ({detail})"
    elif isinstance(e, (EndpointConnectionError, ConnectionError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")
        what = f"cannot reach {endpoint} ({detail})"
    else:
        what = f"{type(e).__name__}: {detail}"
    return StorageError(f"{uri}: {what}")


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn fsspec/s3fs/botocore errors inside the block into a StorageError naming `uri`."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except StorageError:
        raise
    except (OSError, BotoCoreError) as e:
        raise storage_error(uri, e) from None
