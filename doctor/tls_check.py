"""The TLS certificate HAProxy serves on the secure port: readable, a certificate with its
private key (HAProxy wants both in one PEM), valid for the name Creatio connects to, and not
expiring soon. Pure: PEM bytes, a host name and a clock in; results out."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from doctor.report import Result, failed, passed, skipped, warned

WARN_DAYS = 21


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the certificate is valid for; the CN only when there is no SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return cns, []
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def name_matches(host: str, dns_names: list[str], ips: list[str]) -> bool:
    """RFC 6125 matching: exact (case-insensitive), or one ``*`` as the whole left-most label."""
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    wanted = host.lower().rstrip(".")
    for name in dns_names:
        pattern = name.lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            first, rest = wanted.split(".", 1)
            if first and rest == pattern[2:] and rest.count(".") >= 1:
                return True
    return False


def check_certificate(
    pem: bytes, source: str, host: str | None, now: dt.datetime, warn_days: int = WARN_DAYS
) -> list[Result]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        return [failed("TLS certificate readable", f"{source} holds no PEM certificate",
                       "concatenate the certificate, its chain and the private key into one PEM file "
                       "(cat cert.pem chain.pem key.pem > haproxy.pem)")]
    cert = certs[0]
    results: list[Result] = []
    key_result = _check_key(pem, cert, source)
    results.append(key_result)
    dns_names, ips = _names(cert)
    shown = ", ".join(dns_names + ips) or "no names"
    if host is None:
        results.append(warned("TLS certificate matches the host name", f"valid for {shown}; no host name given",
                               "give --public-host with the name in Creatio's 'Message exchange server' URL"))
    elif name_matches(host, dns_names, ips):
        results.append(passed("TLS certificate matches the host name", f"{host} (certificate: {shown})"))
    else:
        results.append(failed("TLS certificate matches the host name", f"{host} is not among {shown}",
                              "get a certificate for the name Creatio connects to, or use that name in the URL"))
    not_after = cert.not_valid_after_utc
    not_before = cert.not_valid_before_utc
    days = (not_after - now).total_seconds() / 86400
    expiry = f"valid until {not_after:%Y-%m-%d %H:%M} UTC"
    name = "TLS certificate not expiring soon"
    if now < not_before:
        results.append(failed(name, f"not valid before {not_before:%Y-%m-%d %H:%M} UTC",
                              "check this machine's clock, or wait for the certificate's start date"))
    elif days <= 0:
        results.append(failed(name, f"expired on {not_after:%Y-%m-%d}", "renew the certificate and reload HAProxy"))
    elif days < warn_days:
        results.append(warned(name, f"{expiry}: {days:.0f} days left",
                              "renew the certificate and reload HAProxy (`python -m balancer reload`)"))
    else:
        results.append(passed(name, f"{expiry} ({days:.0f} days)"))
    return results


def _check_key(pem: bytes, cert: x509.Certificate, source: str) -> Result:
    name = "TLS certificate readable, with its key"
    key = None
    markers = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN RSA PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----")
    for marker in markers:
        start = pem.find(marker)
        if start >= 0:
            end_marker = marker.replace(b"BEGIN", b"END")
            end = pem.find(end_marker, start)
            if end > 0:
                try:
                    key = serialization.load_pem_private_key(pem[start:end + len(end_marker)], password=None)
                except (ValueError, TypeError):
                    return failed(name, f"{source}: the private key cannot be read (encrypted?)",
                                  "HAProxy needs an unencrypted key: `openssl pkey -in key.pem -out plain.pem`")
            break
    if key is None:
        return failed(name, f"{source} has a certificate but no private key",
                      "HAProxy wants one PEM with the certificate, the chain and the key: "
                      "cat cert.pem chain.pem key.pem > haproxy.pem")
    cert_public = cert.public_key()
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        key_public = key.public_key()
        same = key_public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == cert_public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not same:
            return failed(name, f"{source}: the private key does not belong to the certificate",
                          "put the key the certificate was issued for in the PEM")
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    return passed(name, f"{source}: {subject}")


def check_certificate_file(path: Path | None, host: str | None, now: dt.datetime | None = None) -> list[Result]:
    if path is None:
        return [skipped("TLS certificate", "no TLS certificate configured (--tls-cert or tls_cert in --cluster)")]
    try:
        pem = path.read_bytes()
    except OSError as exc:
        return [failed("TLS certificate readable", f"{path}: {exc.strerror}",
                       "the file must exist and be readable by the user HAProxy starts as (root or haproxy)")]
    return check_certificate(pem, str(path), host, now or dt.datetime.now(dt.UTC))
