"""ESMTP parameters of MAIL and RCPT, and SASL credentials: pure parsing.

aiosmtpd upper-cases MAIL parameters and refuses any it does not know (DSN's
RET, ENVID, NOTIFY, ORCPT among them), so the harness reads them itself:
each is kept exactly as sent, and decoded (xtext, RFC 3461 4) beside it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field

_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


class ParamError(ValueError):
    """A parameter the client sent is malformed: the reply to send."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: "+XX" is the octet XX, everything else stands for itself."""
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def split_params(options: list[str]) -> list[tuple[str, str | None]]:
    """[("SIZE", "100"), ("SMTPUTF8", None)]: keyword upper-cased, value as sent."""
    out = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if not key or not key.replace("-", "").isalnum() or (eq and not value):
            raise ParamError(f"501 5.5.4 Malformed parameter {opt[:40]}")
        out.append((key.upper(), value if eq else None))
    return out


@dataclass
class MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None  # decoded
    requiretls: bool = False
    auth: str | None = None  # RFC 4954 AUTH=, decoded


@dataclass
class RcptParams:
    notify: list[str] = field(default_factory=list)
    orcpt: str | None = None  # "addr-type;address", address decoded


def parse_mail_params(options: list[str], *, dsn: bool, eightbitmime: bool, smtputf8: bool,
                      binarymime: bool, requiretls: bool) -> MailParams:
    """The MAIL FROM parameters this server takes; ParamError for the rest."""
    p = MailParams()
    seen: set[str] = set()
    for key, value in split_params(options):
        if key in seen:
            raise ParamError(f"501 5.5.4 Duplicate MAIL parameter {key}")
        seen.add(key)
        if key == "SIZE":
            if value is None or not value.isdigit():
                raise ParamError("501 5.5.4 SIZE takes a number of octets")
            p.size = int(value)
        elif key == "BODY" and eightbitmime:
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME") and not (binarymime and body == "BINARYMIME"):
                raise ParamError("501 5.5.4 BODY must be 7BIT or 8BITMIME"
                                 + (" or BINARYMIME" if binarymime else ""))
            p.body = body
        elif key == "SMTPUTF8" and smtputf8:
            if value is not None:
                raise ParamError("501 5.5.4 SMTPUTF8 takes no value")
            p.smtputf8 = True
        elif key == "RET" and dsn:
            if (value or "").upper() not in ("FULL", "HDRS"):
                raise ParamError("501 5.5.4 RET must be FULL or HDRS")
            p.ret = (value or "").upper()
        elif key == "ENVID" and dsn:
            if not value:
                raise ParamError("501 5.5.4 ENVID needs a value")
            p.envid = xtext_decode(value)
        elif key == "REQUIRETLS" and requiretls:
            if value is not None:
                raise ParamError("501 5.5.4 REQUIRETLS takes no value")
            p.requiretls = True
        elif key == "AUTH":
            p.auth = xtext_decode(value or "<>")
        else:
            raise ParamError(f"555 5.5.4 MAIL FROM parameter {key} not recognized")
    return p


def parse_rcpt_params(options: list[str], *, dsn: bool) -> RcptParams:
    p = RcptParams()
    seen: set[str] = set()
    for key, value in split_params(options):
        if key in seen:
            raise ParamError(f"501 5.5.4 Duplicate RCPT parameter {key}")
        seen.add(key)
        if key == "NOTIFY" and dsn:
            words = [w.upper() for w in (value or "").split(",")]
            if not words or any(w not in _NOTIFY for w in words) or (
                "NEVER" in words and len(words) > 1
            ):
                raise ParamError("501 5.5.4 NOTIFY is NEVER, or any of SUCCESS,FAILURE,DELAY")
            p.notify = words
        elif key == "ORCPT" and dsn:
            kind, semi, addr = (value or "").partition(";")
            if not semi or not kind or not addr:
                raise ParamError("501 5.5.4 ORCPT must be addr-type;address")
            p.orcpt = f"{kind};{xtext_decode(addr)}"
        else:
            raise ParamError(f"555 5.5.4 RCPT TO parameter {key} not recognized")
    return p


# ------------------------------------------------------------------- SASL


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def b64_decode(text: str) -> str:
    """Base64 (RFC 4954) to text; ParamError 501 when it is not base64."""
    try:
        return base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise ParamError("501 5.5.2 Cannot decode response") from e


def plain_credentials(response: str) -> tuple[str, str]:
    """PLAIN (RFC 4616): authzid NUL authcid NUL password -> (user, password)."""
    parts = b64_decode(response).split("\0")
    if len(parts) != 3:
        raise ParamError("501 5.5.2 Malformed PLAIN response")
    authzid, authcid, password = parts
    return authcid or authzid, password


def cram_md5_valid(challenge: str, response: str, password: str | None) -> tuple[str, bool]:
    """CRAM-MD5 (RFC 2195): "user hexdigest" -> (user, digest matches)."""
    user, _, digest = b64_decode(response).rpartition(" ")
    if not user:
        raise ParamError("501 5.5.2 Malformed CRAM-MD5 response")
    if password is None:
        return user, False
    expected = hmac.new(password.encode(), challenge.encode(), hashlib.md5).hexdigest()
    return user, hmac.compare_digest(expected, digest.lower())


# ------------------------------------------------------------------ paths

# RFC 5321 4.1.2 paths, written out because no library parses them: the
# email package reads RFC 5322 addresses (comments, display names, folding),
# which are not what MAIL FROM and RCPT TO carry, and its parser is private.
# Atoms take any non-ASCII character too (RFC 6531, SMTPUTF8); whether a
# non-ASCII address is allowed is the caller's business.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL = (rf'(?:{_ATOM}(?:\.{_ATOM})*'
          r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*")')
_DOMAIN = r"(?:[^\s<>@\[\]\"\\,;:()]+|\[[^\[\]\\\s]*\])"
_MAILBOX = rf"{_LOCAL}(?:@{_DOMAIN})?"
#: "<[@relay,@relay:]mailbox>" then the parameters; a source route is read
#: and dropped (RFC 5321 4.1.1.3: servers should ignore it).
_ANGLE = re.compile(rf"\s*<(?:@{_DOMAIN}(?:,@{_DOMAIN})*:)?({_MAILBOX})>(.*)\Z", re.S)
#: A bare mailbox, as lenient servers (Postfix by default) also take.
_BARE = re.compile(rf"\s*({_MAILBOX})(\s.*)?\Z", re.S)


def parse_path(text: str) -> tuple[str, str] | None:
    """(address, the rest) of a MAIL FROM:/RCPT TO: argument after the
    keyword; "<>" for the null path; None when it is not a path."""
    stripped = text.lstrip()
    if stripped.startswith("<>"):
        return "<>", stripped[2:]
    m = _ANGLE.match(text) or _BARE.match(text)
    if m is None:
        return None
    return m.group(1), m.group(2) or ""
