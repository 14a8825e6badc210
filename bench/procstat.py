"""What a server process costs, read from /proc: CPU seconds, resident memory, and which
process listens on a port (so the load tester can find the room without being told).

The parse_* functions are pure (text in, numbers out); the others read /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"
NET_TCP_FILES = ("/proc/net/tcp", "/proc/net/tcp6")


def parse_stat(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from the text of /proc/PID/stat.

    The command name (field 2) may hold spaces and parentheses, so fields are counted
    from the last ')'.
    """
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]), int(fields[12])


def parse_box_busy(cpu_line: str) -> int:
    """Busy clock ticks in the `cpu` line of /proc/stat: all but idle and iowait."""
    ticks = [int(field) for field in cpu_line.split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4]


def parse_status_rss(text: str) -> int:
    """VmRSS in bytes from the text of /proc/PID/status."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmRSS unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmRSS line (a kernel thread or a zombie has none)")


def parse_listening_inodes(text: str, port: int) -> set[int]:
    """Socket inodes listening on `port`, from the text of /proc/net/tcp or tcp6."""
    inodes: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        if int(fields[1].rpartition(":")[2], 16) == port:
            inodes.add(int(fields[9]))
    return inodes


def parse_environ(data: bytes, prefix: str = "") -> dict[str, str]:
    """The variables starting with `prefix` from the bytes of /proc/PID/environ."""
    found = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.decode(errors="replace").partition("=")
        if sep and name.startswith(prefix):
            found[name] = value
    return found


def environ(pid: int, prefix: str = "") -> dict[str, str]:
    """A process's environment variables starting with `prefix` (as it was started)."""
    return parse_environ(Path(f"/proc/{pid}/environ").read_bytes(), prefix)


def box_busy_seconds() -> float:
    """CPU seconds all cores of the box have been busy since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        return parse_box_busy(stat.readline()) / CLOCK_TICKS


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used so far."""
    utime, stime = parse_stat(Path(f"/proc/{pid}/stat").read_text())
    return utime / CLOCK_TICKS, stime / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    return parse_status_rss(Path(f"/proc/{pid}/status").read_text())


def listening_inodes(port: int) -> set[int]:
    inodes: set[int] = set()
    for name in NET_TCP_FILES:
        try:
            inodes |= parse_listening_inodes(Path(name).read_text(), port)
        except FileNotFoundError:
            continue
    return inodes


def _pids() -> Iterable[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def pids_owning(inodes: set[int]) -> list[int]:
    """Processes holding any of these socket inodes (only processes we may inspect)."""
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners: list[int] = []
    for pid in _pids():
        try:
            with os.scandir(f"/proc/{pid}/fd") as fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) in wanted:
                            owners.append(pid)
                            break
                    except OSError:
                        continue
        except OSError:
            continue
    return sorted(owners)


def pids_listening(port: int) -> list[int]:
    """Every process with a TCP socket listening on `port` (several with SO_REUSEPORT)."""
    return pids_owning(listening_inodes(port))
