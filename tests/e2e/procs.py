"""Helpers for tests that read what vLLM's child processes logged."""

import re
import socket

# vLLM prefixes every line a child process logs with "(EngineCore pid=N)", "(VllmWorker-0 pid=N)".
_PREFIX = re.compile(r"^\((?P<proc>[\w-]+) pid=(?P<pid>\d+)\)")


def lines_from(log: str, process_prefix: str, needle: str) -> list[tuple[str, int]]:
    """(name, pid) of each line logged by a process named process_prefix* containing needle."""
    found = []
    for line in log.splitlines():
        match = _PREFIX.match(line)
        if match and match["proc"].startswith(process_prefix) and needle in line:
            found.append((match["proc"], int(match["pid"])))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
