"""People's passwords: argon2id through argon2-cffi (a maintained binding of the reference
implementation), a minimum length, and a refusal of the passwords guessed first.

No password and no hash is ever logged or answered: this module returns booleans and reasons.
"""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# RFC 9106's second recommended option (memory-constrained): argon2id, t=3, m=64 MiB, p=4 -
# argon2-cffi's default profile. About 50 ms of one core per hash on the CI machine.
_HASHER = PasswordHasher()
# Verified against when the email is unknown, so that an unknown account costs the same time
# as a wrong password (no account enumeration by timing).
_DUMMY = _HASHER.hash("pumpwatch: no such account")

# What guessers try first, as bases: a password that is one of these once digits, symbols and
# case are taken off its ends ("Password2024!", "Welcome1234") is refused. A short hand-made
# list of the words and keyboard walks that dominate the heads of public breach-frequency
# lists, plus this field's own words; it is not a copy of any list (a larger one, or a
# breached-password service, would catch more: see the README).
_COMMON_BASES = frozenset(
    [
        "password",
        "passw0rd",
        "p@ssword",
        "p@ssw0rd",
        "pass",
        "passwort",
        "motdepasse",
        "contrasena",
        "wachtwoord",
        "qwerty",
        "qwertyuiop",
        "qwertz",
        "azerty",
        "asdf",
        "asdfgh",
        "asdfghjkl",
        "zxcvbn",
        "zxcvbnm",
        "qazwsx",
        "1qaz2wsx",
        "1q2w3e4r",
        "1q2w3e4r5t",
        "1q2w3e4r5t6y",
        "q1w2e3r4",
        "q1w2e3r4t5",
        "abc",
        "abcd",
        "abcdef",
        "abcdefg",
        "abc123",
        "letmein",
        "welcome",
        "iloveyou",
        "admin",
        "administrator",
        "root",
        "changeme",
        "secret",
        "default",
        "guest",
        "user",
        "login",
        "master",
        "monkey",
        "dragon",
        "shadow",
        "sunshine",
        "princess",
        "football",
        "baseball",
        "soccer",
        "hockey",
        "basketball",
        "superman",
        "batman",
        "trustno1",
        "starwars",
        "whatever",
        "freedom",
        "charlie",
        "michael",
        "jordan",
        "jennifer",
        "hunter",
        "killer",
        "ranger",
        "buster",
        "thomas",
        "tigger",
        "robert",
        "daniel",
        "jessica",
        "ashley",
        "bailey",
        "summer",
        "winter",
        "spring",
        "autumn",
        "hello",
        "hellothere",
        "letmeinnow",
        "iloveyouforever",
        "lovely",
        "love",
        "flower",
        "computer",
        "internet",
        "pokemon",
        "minecraft",
        "nintendo",
        "samsung",
        "google",
        "apple",
        "microsoft",
        "hospital",
        "clinic",
        "nurse",
        "doctor",
        "pumpwatch",
        "medtronic",
        "baclofen",
        "morphine",
        "patient",
        "health",
        "zaq12wsx",
        "zaq1xsw2",
        "qwe123",
        "qweasd",
        "qweasdzxc",
        "asd123",
        "aaaaaa",
        "abcabc",
        "test",
        "testing",
        "test123",
        "temp",
        "temporary",
        "access",
        "welcome1",
        "monday",
        "tuesday",
        "friday",
        "sunday",
        "january",
        "december",
    ]
)
_EDGES = re.compile(r"^[\W\d_]+|[\W\d_]+$")
_SEQUENCES = (
    "0123456789",
    "9876543210",
    "abcdefghijklmnopqrstuvwxyz",
    "qwertyuiopasdfghjklzxcvbnm",
)


class WeakPassword(ValueError):
    """A password that would be guessed: the message says why (never the password)."""


def check(password: str, *, min_length: int, email: str = "", display_name: str = "") -> None:
    """Raises :class:`WeakPassword` for a password too short, too common, made of one repeated
    or sequential run, or containing the person's email name or display name."""
    if len(password) < min_length:
        raise WeakPassword(f"at least {min_length} characters")
    if len(password) > 200:
        raise WeakPassword("at most 200 characters")
    lowered = password.lower()
    base = _EDGES.sub("", lowered)
    if not base or base in _COMMON_BASES or lowered in _COMMON_BASES:
        raise WeakPassword("one of the passwords guessed first; choose another")
    if len(set(lowered)) <= 2 or any(lowered in s for s in _SEQUENCES):
        raise WeakPassword("a repeated or sequential run of characters; choose another")
    name = email.split("@", 1)[0].lower()
    words = [w for w in re.split(r"\W+", display_name.lower()) if len(w) >= 4]
    if (len(name) >= 4 and name in lowered) or any(w in lowered for w in words):
        raise WeakPassword("contains your name or email; choose another")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the stored hash (None: no password set yet - the dummy is
    verified anyway, so that the answer takes the same time)."""
    try:
        return _HASHER.verify(stored or _DUMMY, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """The hash was made with weaker parameters than today's: store a new one at sign-in."""
    return _HASHER.check_needs_rehash(stored)
