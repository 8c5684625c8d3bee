"""Images named by ``image_url`` parts, fetched under limits: ``data:`` URLs, http(s) URLs, allowed local files.

- ``data:`` URLs (base64 or percent-encoded) are decoded in memory.
- http(s) URLs are fetched with a byte limit, a time limit and at most ``MAX_REDIRECTS`` redirects. Every
  connection (redirects included) goes to an address checked after DNS resolution, so a URL cannot reach
  loopback, private, link-local (cloud metadata) or other non-public addresses (server-side request forgery)
  unless the operator allowed that network (``--allow-media-network``). No proxy is used.
- Local files (``file://`` URLs or absolute paths) only below the folders the operator listed
  (``--allowed-local-media``), after resolving symbolic links and ``..``; without such folders none are read.

Every image is decoded here, with the model package's decoder and its pixel limit, into a PIL image: the engine
only ever receives decoded pixels, never a path or a URL of the client's choosing.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import anyio
import httpcore
from PIL import Image

from mlx_llama4.images import ImageError, load_image

from .errors import APIError

MAX_REDIRECTS = 3
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # the web app's limit: a 40-megapixel photo; the model sees <= 16 tiles


class MediaError(ValueError):
    """An image that cannot be had: refused by policy, not found, too big, too slow, or not an image."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from and how large they may be."""

    max_bytes: int = 20 * 2**20
    timeout: float = 10.0  # seconds for one http(s) image, redirects included
    local_dirs: tuple[Path, ...] = ()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def build(cls, max_bytes: int, timeout: float, local_dirs: Sequence[str | Path] = (),
              allowed_networks: Sequence[str] = (), max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> "MediaPolicy":
        """A policy from command-line values; ValueError naming a bad folder or network."""
        dirs = []
        for d in local_dirs:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"--allowed-local-media {d}: not a folder")
            dirs.append(path)
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        except ValueError as e:
            raise ValueError(f"--allow-media-network: {e}") from None
        return cls(max_bytes, timeout, tuple(dirs), networks, max_pixels)

    def address_allowed(self, address: str) -> bool:
        """A public unicast address, or one inside a network the operator allowed."""
        ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone ("%eth0") is not part of the address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return True
        return ip.is_global and not ip.is_multicast


def _short(url: str) -> str:
    return url if len(url) <= 100 else url[:80] + f"... ({len(url)} characters)"


class _CheckedBackend(httpcore.AnyIOBackend):
    """Resolves the host itself and connects only to an allowed address (TLS still verifies the host name)."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    async def connect_tcp(self, host: str, port: int, timeout: Optional[float] = None, local_address=None,
                          socket_options=None):
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise MediaError(f"cannot resolve {host}: {e}") from None
        addresses = [info[4][0] for info in infos]
        refused = [a for a in addresses if not self.policy.address_allowed(a)]
        if refused or not addresses:
            raise MediaError(f"{host} resolves to {refused[0] if refused else 'nothing'}, a non-public address; "
                             "image URLs may only name public hosts (see --allow-media-network)")
        return await super().connect_tcp(addresses[0], port, timeout, local_address, socket_options)


async def _download(url: str, policy: MediaPolicy) -> bytes:
    timeouts = {"connect": policy.timeout, "read": policy.timeout, "write": policy.timeout, "pool": policy.timeout}
    headers = [(b"Accept", b"image/*"), (b"User-Agent", b"mlx-llama4-server")]
    async with httpcore.AsyncConnectionPool(network_backend=_CheckedBackend(policy), retries=0) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            async with pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response:
                fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                if response.status in (301, 302, 303, 307, 308) and "location" in fields:
                    url = urllib.parse.urljoin(url, fields["location"])
                    if not url.lower().startswith(("http://", "https://")):
                        raise MediaError(f"the image URL redirects to {_short(url)}, which is not http(s)")
                    continue
                if response.status != 200:
                    raise MediaError(f"{_short(url)} answered HTTP {response.status}")
                declared = fields.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise MediaError(f"{_short(url)} is {declared} bytes, above the limit of {policy.max_bytes} bytes")
                data = bytearray()
                async for chunk in response.aiter_stream():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise MediaError(f"{_short(url)} is larger than the limit of {policy.max_bytes} bytes")
                return bytes(data)
    raise MediaError(f"the image URL redirects more than {MAX_REDIRECTS} times")


def _local_path(url: str, policy: MediaPolicy) -> Path:
    if not policy.local_dirs:
        raise MediaError("local image files are not served; the server must be started with "
                         "--allowed-local-media DIR to allow a folder")
    raw = urllib.request.url2pathname(urllib.parse.urlparse(url).path) if url.lower().startswith("file:") else url
    path = Path(raw).resolve()  # symbolic links and ".." resolved before the check
    if not any(path.is_relative_to(d) for d in policy.local_dirs):
        raise MediaError(f"{_short(raw)} is outside the folders allowed with --allowed-local-media")
    if not path.is_file():
        raise MediaError(f"{_short(raw)}: no such file")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"{_short(raw)} is larger than the limit of {policy.max_bytes} bytes")
    return path


async def fetch_image(url: str, policy: MediaPolicy) -> Image.Image:
    """The decoded RGB image that ``url`` names, within ``policy``; MediaError saying why not otherwise."""
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        if len(url) > policy.max_bytes * 4 // 3 + 1024:  # base64 is 4/3 of the bytes it encodes
            raise MediaError(f"the data URL is larger than the limit of {policy.max_bytes} bytes")
        source = url
    elif lowered.startswith(("http://", "https://")):
        try:
            with anyio.fail_after(policy.timeout):
                source = await _download(url, policy)
        except TimeoutError:
            raise MediaError(f"{_short(url)} did not arrive within {policy.timeout:g} s") from None
        except httpcore.TimeoutException:
            raise MediaError(f"{_short(url)} did not answer within {policy.timeout:g} s") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
            raise MediaError(f"cannot fetch {_short(url)}: {e or type(e).__name__}") from None
    elif lowered.startswith(("file:", "/")):
        source = _local_path(url, policy)
    else:
        raise MediaError(f"unsupported image URL {_short(url)!r}: expected a data: URL, an http(s) URL or, where "
                         "the server allows it, a local file path")
    try:
        return await anyio.to_thread.run_sync(functools.partial(load_image, source, max_pixels=policy.max_pixels))
    except ImageError as e:
        raise MediaError(str(e)) from None


async def request_image(url: str, policy: MediaPolicy, where: str) -> Image.Image:
    """``fetch_image`` for a request field: a refusal is a 400 naming the field (``where``)."""
    try:
        return await fetch_image(url, policy)
    except MediaError as e:
        raise APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None
