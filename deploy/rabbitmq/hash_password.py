"""Print a RabbitMQ password hash for definitions.json (rabbit_password_hashing_sha256).

The format is base64(salt + sha256(salt + utf8 password)) with a random 4-byte salt, the same as
`rabbitmqctl hash_password`. Usage: `python deploy/rabbitmq/hash_password.py` (prompts without
echo), or pipe the password on stdin.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import sys


def password_hash(password: str, salt: bytes | None = None) -> str:
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def main() -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("hash_password: empty password", file=sys.stderr)
        return 2
    print(password_hash(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
