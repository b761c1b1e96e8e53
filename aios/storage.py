"""One storage interface over local directories and `s3://bucket/prefix` (any S3-compatible service).

Backed by `pyarrow.fs`, what Ray Train itself uses for its storage (`RunConfig(storage_filesystem=...)`), so
the same filesystem object can later be handed to Ray, and no second S3 client is needed: it is already
installed with Ray, it streams large files, and it reads credentials the standard AWS way (environment,
profile, instance role). The endpoint of a non-AWS service (MinIO, Ceph, R2) comes from
`--s3-endpoint-url` or $AWS_ENDPOINT_URL.

S3 has no rename and no append, so nothing here relies on them: an object is written by one PUT, which a
reader sees whole or not at all, and a set of objects is published by writing, last, one small object that
names it (see aios.bundle.remote). Error messages name the location and the problem, never a credential.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from aios.errors import AiosError

S3_SCHEME = "s3://"
# Bytes per read of a transfer: on S3 each read of a download is one ranged GET, so pyarrow's default (1 MiB)
# makes a 360 MB checkpoint 360 requests; 32 MiB downloaded 100 MB ten times faster from the test endpoint.
TRANSFER_CHUNK = 32 << 20
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3_SCHEME)


def redact(text: str) -> str:
    """`text` with the value of every credential variable replaced (an error message may quote a request)."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@dataclass(frozen=True)
class Storage:
    """A root location: a local directory or s3://bucket/prefix. Paths given to the methods are relative to it
    ("/"-separated)."""

    uri: str
    endpoint_url: str | None = None

    def __post_init__(self):
        if is_remote(self.uri):
            parsed = urlparse(self.uri)
            if not parsed.netloc:
                raise AiosError(f"{self.uri}: no bucket; write s3://BUCKET/PREFIX, e.g. s3://my-bucket/brains")

    # -- the filesystem ---------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def bucket(self) -> str | None:
        return urlparse(self.uri).netloc if self.remote else None

    def _root(self) -> str:
        if not self.remote:
            return str(Path(self.uri).resolve())
        parsed = urlparse(self.uri)
        return f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")

    def filesystem(self):
        """The pyarrow filesystem (made once per Storage)."""
        cached = _FILESYSTEMS.get((self.uri, self.endpoint_url))
        if cached is None:
            cached = _FILESYSTEMS[(self.uri, self.endpoint_url)] = self._make_filesystem()
        return cached

    def _make_filesystem(self):
        from pyarrow import fs

        if not self.remote:
            return fs.LocalFileSystem()
        options = {"connect_timeout": 5, "request_timeout": 30,
                   "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3)}
        if self.endpoint_url:
            endpoint = urlparse(self.endpoint_url)
            if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
                raise AiosError(f"--s3-endpoint-url {self.endpoint_url}: expected http(s)://HOST[:PORT], e.g. "
                                f"http://127.0.0.1:9000")
            options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:  # else the SDK's own resolution (profile, the bucket's region)
            options["region"] = region
        if not _credentials_configured():
            raise AiosError(f"{self.uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                            f"AWS_PROFILE (~/.aws/credentials), or run where an instance role provides them")
        return fs.S3FileSystem(**options)

    def path(self, relative: str = "") -> str:
        root = self._root()
        return f"{root}/{relative.strip('/')}" if relative.strip("/") else root

    def describe(self, relative: str = "") -> str:
        """The location as the user would write it."""
        return f"{self.uri.rstrip('/')}/{relative.strip('/')}" if relative.strip("/") else self.uri

    # -- operations -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse at once a bucket that does not exist or an endpoint that does not answer (one line)."""
        if not self.remote:
            return
        from pyarrow import fs

        info = self._call(lambda: self.filesystem().get_file_info(self.bucket), "")
        if info.type == fs.FileType.NotFound:
            raise AiosError(f"{self.uri}: bucket '{self.bucket}' does not exist{self._where()}; create it or fix "
                            f"the bucket name")

    def exists(self, relative: str) -> bool:
        from pyarrow import fs

        info = self._call(lambda: self.filesystem().get_file_info(self.path(relative)), relative)
        return info.type != fs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        def read():
            with self.filesystem().open_input_stream(self.path(relative)) as stream:
                return stream.read()

        return self._call(read, relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """One object (S3: one PUT, seen whole or not at all); a local file is written atomically."""
        if not self.remote:
            from aios.atomic import atomic_write

            target = Path(self.path(relative))
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
            return

        def write():
            with self.filesystem().open_output_stream(self.path(relative)) as stream:
                stream.write(data)

        self._call(write, relative)

    def upload_file(self, local: Path, relative: str) -> None:
        from pyarrow import fs

        self._call(lambda: fs.copy_files(str(Path(local).resolve()), self.path(relative),
                                         source_filesystem=fs.LocalFileSystem(),
                                         destination_filesystem=self.filesystem(), chunk_size=TRANSFER_CHUNK),
                   relative)

    def download_file(self, relative: str, local: Path) -> None:
        from pyarrow import fs

        local.parent.mkdir(parents=True, exist_ok=True)
        self._call(lambda: fs.copy_files(self.path(relative), str(local.resolve()), source_filesystem=self.filesystem(),
                                         destination_filesystem=fs.LocalFileSystem(), chunk_size=TRANSFER_CHUNK),
                   relative)

    def list_dirs(self, relative: str = "") -> list[str]:
        """The names directly under `relative` that hold something (S3: common prefixes)."""
        from pyarrow import fs

        selector = fs.FileSelector(self.path(relative), allow_not_found=True)
        infos = self._call(lambda: self.filesystem().get_file_info(selector), relative)
        return sorted(info.base_name for info in infos if info.type == fs.FileType.Directory)

    def list_files(self, relative: str = "") -> list[str]:
        """The names of the files directly under `relative` (none when it does not exist)."""
        return sorted(self.sizes(relative))

    def sizes(self, relative: str = "") -> dict[str, int]:
        """The files directly under `relative` and their sizes in bytes (none when it does not exist)."""
        from pyarrow import fs

        selector = fs.FileSelector(self.path(relative), allow_not_found=True)
        infos = self._call(lambda: self.filesystem().get_file_info(selector), relative)
        return {info.base_name: info.size for info in infos if info.type == fs.FileType.File and info.base_name}

    def copy_file(self, relative: str, to: str) -> None:
        """A copy within the storage (S3: a server-side copy, nothing passes through this machine)."""
        self._call(lambda: self.filesystem().copy_file(self.path(relative), self.path(to)), relative)

    def delete_file(self, relative: str) -> None:
        self._call(lambda: self.filesystem().delete_file(self.path(relative)), relative)

    def delete_dir(self, relative: str) -> None:
        self._call(lambda: self.filesystem().delete_dir(self.path(relative)), relative)

    # -- errors -----------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f" at {self.endpoint_url}" if self.endpoint_url else ""

    def _call(self, operation, relative: str):
        try:
            return operation()
        except FileNotFoundError:
            raise AiosError(f"{self.describe(relative)}: not found{self._where()}") from None
        except OSError as exc:
            raise AiosError(self._explain(exc, relative)) from None

    def _explain(self, exc: OSError, relative: str) -> str:
        text = redact(" ".join(str(exc).split()))
        where = self.describe(relative)
        lowered = text.lower()
        if "nosuchbucket" in lowered or "bucket" in lowered and "not found" in lowered:
            return f"{where}: bucket '{self.bucket}' does not exist{self._where()}; create it or fix the bucket name"
        if any(word in lowered for word in ("couldn't connect", "could not connect", "connection refused",
                                            "curl", "timed out", "resolve host")):
            return (f"{where}: cannot reach the S3 endpoint{self._where() or ' (AWS)'}; check --s3-endpoint-url "
                    f"(or $AWS_ENDPOINT_URL) and that the service is running")
        if any(word in lowered for word in ("accessdenied", "access denied", "invalidaccesskeyid",
                                            "signaturedoesnotmatch", "credentials", "forbidden")):
            return (f"{where}: the S3 service refused the request ({_first_words(text)}); check the AWS "
                    f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)")
        return f"{where}: {_first_words(text)}"


_FILESYSTEMS: dict = {}


def _credentials_configured() -> bool:
    """Whether the AWS credential chain has anything to find: variables, a profile or its files, web identity,
    a container role, or (unless AWS_EC2_METADATA_DISABLED) an instance role that only EC2 can tell about."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    files = (env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(Path(f).expanduser().is_file() for f in files):
        return True
    return env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def _first_words(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def open_storage(uri: str | os.PathLike, endpoint_url: str | None = None) -> Storage:
    """A Storage for `uri`; the endpoint defaults to $AWS_ENDPOINT_URL."""
    return Storage(str(uri), endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
