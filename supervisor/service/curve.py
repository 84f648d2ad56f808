"""CURVE on the daemon's front socket: encryption, and a list of the client
keys let in (``zmq.auth``); the admins' keys are let in too, as clients that
may also operate (``supervisor.service.operators``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import zmq

from supervisor.config import DaemonSettings
from supervisor.service.front import EndpointError
from supervisor.service.secret_files import check_secret_file, check_trusted_folder

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


def certificate_keys(folder: str) -> frozenset[str]:
    """The z85 public keys of the certificates (``*.key``) in ``folder``."""
    if not folder:
        return frozenset()
    from zmq.auth import load_certificates

    try:
        return frozenset(key.decode() for key in load_certificates(folder))
    except (OSError, ValueError) as exc:
        raise EndpointError(f"cannot read the certificates in {folder}: {exc}") from None


class _Keys:
    """The CURVE keys let in: the clients' and the admins'."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq's authenticator gives the key in z85
        return key.decode() in self.keys


def _has_certificates(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith(".key") for f in os.listdir(folder))


def start_curve(
    ctx: zmq.Context, front: zmq.Socket, settings: DaemonSettings, admin_keys: frozenset[str]
) -> ThreadAuthenticator | None:
    """CURVE on ``front`` when ``[daemon] curve_secret_key`` is set: the
    authenticator started (the caller stops it), or None without CURVE."""
    if not settings.curve_secret_key:
        return None
    from zmq.auth import load_certificate
    from zmq.auth.thread import ThreadAuthenticator

    clients = settings.curve_clients_dir
    if clients == "*" or not _has_certificates(clients):
        raise EndpointError(
            f"curve_clients_dir {clients!r} must be a directory holding the allowed clients' public "
            "certificates (*.key); '*' (any key) would authenticate nobody"
        )
    check_trusted_folder(clients, "[daemon] curve_clients_dir")  # whoever may change it decides who gets in
    check_secret_file(settings.curve_secret_key, "[daemon] curve_secret_key")
    allowed = certificate_keys(clients) | admin_keys  # an admin key may connect, as a client
    try:
        public, secret = load_certificate(settings.curve_secret_key)
    except (OSError, ValueError) as exc:
        raise EndpointError(f"curve_secret_key {settings.curve_secret_key!r}: {exc}") from None
    if secret is None:
        raise EndpointError(f"{settings.curve_secret_key} holds no secret key")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve_callback(domain="*", credentials_provider=_Keys(allowed))
        front.curve_secretkey = secret
        front.curve_publickey = public
        front.curve_server = True
    except BaseException:
        auth.stop()
        raise
    return auth
