"""Where the forge may send jobs: the addresses an operator allows runners to have.

A runner chooses the URL the forge calls (its ``healthCheckEndpoint``), and the forge calls it
with the RUNNER_TOKEN and a signature: without a limit, registering is a way to make the forge
send requests anywhere. Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10,
fd00:ec2::254, and their IPv4-mapped forms) are refused unless ALLOWED_RUNNER_NETWORKS lists
them; when that setting lists networks or host names, only those are allowed.

The check runs twice: at registration on every address the host name resolves to, and at
dispatch on the address the socket actually connected to, so a name that resolves elsewhere
later (DNS rebinding) cannot route around it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Refused unless an allowed network covers them.
REFUSED_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)


def _plain(address: IPAddress) -> IPAddress:
    """``::ffff:169.254.169.254`` is 169.254.169.254."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TargetPolicy:
    """ALLOWED_RUNNER_NETWORKS, parsed once: CIDRs (or single addresses) and host names."""

    def __init__(self, allowed: str = "") -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for item in (part.strip() for part in allowed.split(",")):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower().rstrip("."))

    @property
    def restricted(self) -> bool:
        """Whether an allow-list is set (else: everything but the refused networks)."""
        return bool(self.networks or self.hosts)

    def allows(self, address: str, host: str = "") -> bool:
        """Whether the forge may connect to ``address`` for a runner URL naming ``host``."""
        try:
            ip = _plain(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return False
        if any(ip in network for network in self.networks):
            return True
        if any(ip in network for network in REFUSED_NETWORKS):
            return False
        return not self.restricted or host.lower().rstrip(".") in self.hosts

    def refusal(self, url: str) -> str | None:
        """Why a runner URL may not be dispatched to (None: it may). Host names are resolved
        and every address checked; one that does not resolve now is left to dispatch."""
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        if not host:
            return None
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
                infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
            except (OSError, ValueError, UnicodeError):
                return None
            addresses = sorted({str(info[4][0]) for info in infos})
        for address in addresses:
            if not self.allows(address, host):
                return f"{host} ({address}) is not an address runners may have here"
        return None
