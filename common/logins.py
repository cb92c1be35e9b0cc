"""Who may open a console: users with scrypt-hashed passwords (in a JSON file, written whole),
sessions that expire, and a limit on wrong passwords per client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class ConsoleError(Exception):
    """A console cannot start as asked (no user yet, no TLS off loopback...): one line for the operator."""


SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # ~0.1 s and 32 MiB per check: costly to guess offline
IDLE_S, MAX_S = 30 * 60, 12 * 3600  # a session ends after 30 idle minutes, and after 12 hours in any case
FAILS, WINDOW_S, LOCK_S = 5, 15 * 60, 60  # 5 wrong passwords in 15 min: locked 60 s, doubling each time

def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 * 2**20, dklen=32, **SCRYPT)
    return "scrypt${n}${r}${p}$".format(**SCRYPT) + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def password_ok(stored: str, password: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 2**20, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def read_users(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("users", {}))
    except (OSError, ValueError, AttributeError) as exc:
        raise ConsoleError(f"{path}: the console's user file cannot be read ({exc.__class__.__name__})") from None


def add_user(path: Path, name: str, password: str) -> bool:
    """Add or replace a user (only the hash is kept; the file is private to its owner); True if new."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConsoleError(f"{name!r}: a user name is letters, digits, '-', '_' or '.'")
    if len(password) < 12:
        raise ConsoleError("the password must have at least 12 characters")
    users = read_users(path)
    new = name not in users
    users[name] = {"password": hash_password(password), "set_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"users": users}, indent=1) + "\n")
    os.replace(tmp, path)
    return new


# ---- sessions and the login throttle -------------------------------------------------------------

@dataclass
class Session:
    user: str
    csrf: str
    created: float
    seen: float


@dataclass
class Sessions:
    idle_s: float = IDLE_S
    max_s: float = MAX_S
    items: dict[str, Session] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, user: str) -> tuple[str, Session]:
        token, now = secrets.token_urlsafe(32), time.monotonic()
        with self.lock:
            for old in [t for t, s in self.items.items() if now - s.seen > self.idle_s or now - s.created > self.max_s]:
                del self.items[old]  # ended sessions are not kept
            self.items[token] = s = Session(user, secrets.token_urlsafe(32), now, now)
        return token, s

    def get(self, token: str | None) -> Session | None:
        now = time.monotonic()
        with self.lock:
            s = self.items.get(token or "")
            if s is None:
                return None
            if now - s.seen > self.idle_s or now - s.created > self.max_s:
                del self.items[token]
                return None
            s.seen = now
            return s

    def end(self, token: str | None) -> None:
        with self.lock:
            self.items.pop(token or "", None)


@dataclass
class Throttle:
    """Wrong passwords per client address: FAILS within WINDOW_S lock it out for LOCK_S, doubling."""

    fails: dict[str, list[float]] = field(default_factory=dict)
    until: dict[str, tuple[float, int]] = field(default_factory=dict)

    def wait(self, who: str) -> float:
        end, _times = self.until.get(who, (0.0, 0))
        return max(0.0, end - time.monotonic())

    def failed(self, who: str) -> None:
        now = time.monotonic()
        recent = [t for t in self.fails.get(who, []) if now - t < WINDOW_S] + [now]
        self.fails[who] = recent
        if len(recent) >= FAILS:
            _end, times = self.until.get(who, (0.0, 0))
            self.until[who] = (now + LOCK_S * 2**times, times + 1)
            self.fails[who] = []

    def passed(self, who: str) -> None:
        self.fails.pop(who, None)
        self.until.pop(who, None)


# ---- the app --------------------------------------------------------------------------------
