"""DKIM keys and signed messages for the tests and benches (standard library + dkimpy; PyNaCl for Ed25519).

RSA keys are generated here in pure Python (Miller-Rabin; ~0.1-0.5 s for 2048 bits), written as
PKCS#1 PEM for ``dkim.sign`` and as the base64 SubjectPublicKeyInfo that goes into the key record
``v=DKIM1; k=rsa; p=...``. No openssl binary, no ``cryptography`` package.
"""

from __future__ import annotations

import base64
import secrets
import textwrap
from dataclasses import dataclass

import dkim

_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p ** 0.5) + 1))]


def _probable_prime(n: int, rounds: int = 24) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(rounds):
        a = secrets.randbelow(n - 3) + 2
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, e: int) -> int:
    while True:
        n = secrets.randbits(bits) | (0b11 << (bits - 2)) | 1  # top two bits: p*q has 2*bits bits
        if (n - 1) % e and _probable_prime(n):
            return n


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _int(n: int) -> bytes:
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))  # a leading zero byte keeps it positive


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


RSA_OID = bytes.fromhex("06092a864886f70d010101")


@dataclass(frozen=True)
class RsaKey:
    private_pem: bytes  # PKCS#1 "RSA PRIVATE KEY", what dkim.sign takes
    public_b64: str  # SubjectPublicKeyInfo, base64: the p= of the key record
    bits: int

    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


def rsa_key(bits: int = 2048, e: int = 65537) -> RsaKey:
    p, q = _prime(bits // 2, e), _prime(bits // 2, e)
    while q == p:
        q = _prime(bits // 2, e)
    n, phi = p * q, (p - 1) * (q - 1)
    d = pow(e, -1, phi)
    priv = _seq(_int(0), _int(n), _int(e), _int(d), _int(p), _int(q), _int(d % (p - 1)), _int(d % (q - 1)),
                _int(pow(q, -1, p)))
    pem = (b"-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(textwrap.wrap(base64.b64encode(priv).decode(), 64)).encode()
           + b"\n-----END RSA PRIVATE KEY-----\n")
    spki = _seq(_seq(RSA_OID, b"\x05\x00"), _der(0x03, b"\x00" + _seq(_int(n), _int(e))))
    return RsaKey(pem, base64.b64encode(spki).decode(), n.bit_length())


def rsa_public_record(n: int, e: int = 65537) -> str:
    """A key record for any modulus and exponent (e.g. a hostile 16384-bit one; no private key)."""
    spki = _seq(_seq(RSA_OID, b"\x05\x00"), _der(0x03, b"\x00" + _seq(_int(n), _int(e))))
    return f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"


@dataclass(frozen=True)
class Ed25519Key:
    private_b64: bytes  # the 32-byte seed, base64: what dkim.sign takes for ed25519-sha256
    public_b64: str

    def record(self) -> str:
        return f"v=DKIM1; k=ed25519; p={self.public_b64}"


def ed25519_key() -> Ed25519Key:
    import nacl.encoding
    import nacl.signing

    sk = nacl.signing.SigningKey.generate()
    return Ed25519Key(sk.encode(nacl.encoding.Base64Encoder),
                      sk.verify_key.encode(nacl.encoding.Base64Encoder).decode())


def message(from_addr: str = "alice@sender.test", subject: str = "hello", body: bytes = b"Hi Bob,\r\n",
            extra_headers: bytes = b"") -> bytes:
    return (f"From: Alice <{from_addr}>\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 07:00:00 +0000\r\nMessage-ID: <{secrets.token_hex(8)}@sender.test>\r\n"
            ).encode() + extra_headers + b"\r\n" + body


def sign(msg: bytes, domain: str, selector: str, key: RsaKey | Ed25519Key) -> bytes:
    """``msg`` with a DKIM-Signature (relaxed/simple, rsa-sha256 or ed25519-sha256) prepended."""
    if isinstance(key, Ed25519Key):
        sig = dkim.sign(msg, selector.encode(), domain.encode(), key.private_b64,
                        signature_algorithm=b"ed25519-sha256")
    else:
        sig = dkim.sign(msg, selector.encode(), domain.encode(), key.private_pem)
    return sig + msg
