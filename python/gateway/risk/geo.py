"""IP address to country in plain Python, for offline backtests (`gateway rules backtest --data-dir`).

A port of `rust/fastpath/src/geo.rs` with the same semantics: the built-in table maps only the
documentation ranges (RFC 5737, RFC 3849), and `risk.geoip_file` adds `cidr,country` lines. Inside a
running gateway the backtest asks the fast path itself (`FastPath.ip_country`), so both answers agree.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools

BUILTIN: tuple[tuple[str, str], ...] = (
    ("192.0.2.0/24", "US"),
    ("198.51.100.0/24", "GB"),
    ("203.0.113.0/24", "DE"),
    ("2001:db8::/32", "NL"),
)


def _to_int(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    # IPv4 lives in the IPv4-mapped part of the IPv6 space, as in the Rust table.
    if isinstance(ip, ipaddress.IPv4Address):
        return int(ipaddress.IPv6Address(f"::ffff:{ip}"))
    return int(ip)


class GeoTable:
    def __init__(self, entries: list[tuple[str, str]]) -> None:
        ranges: list[tuple[int, int, str]] = []
        for i, (cidr, country) in enumerate(entries):
            try:
                net = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as e:
                raise ValueError(f"entry {i + 1}: {e}") from None
            c = country.strip().upper()
            if len(c) != 2 or not c.isascii() or not c.isalpha():
                raise ValueError(f"entry {i + 1}: '{country}' is not a two-letter country code")
            first = _to_int(net.network_address)
            ranges.append((first, first + net.num_addresses - 1, c))
        ranges.sort()
        for a, b in itertools.pairwise(ranges):
            if b[0] <= a[1]:
                raise ValueError("ranges overlap")
        self._firsts = [r[0] for r in ranges]
        self._ranges = ranges

    @classmethod
    def builtin(cls) -> GeoTable:
        return cls(list(BUILTIN))

    @classmethod
    def from_csv(cls, text: str) -> GeoTable:
        """`cidr,country` lines (blank lines and `#` comments skipped) plus the built-in ranges."""
        entries = list(BUILTIN)
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            cidr, sep, country = line.partition(",")
            if not sep:
                raise ValueError(f"line {n}: expected 'cidr,country'")
            entries.append((cidr, country))
        return cls(entries)

    def country(self, ip: str) -> str | None:
        try:
            x = _to_int(ipaddress.ip_address(ip))
        except ValueError:
            return None
        i = bisect.bisect_right(self._firsts, x) - 1
        if i >= 0 and self._ranges[i][0] <= x <= self._ranges[i][1]:
            return self._ranges[i][2]
        return None
