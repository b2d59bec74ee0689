"""``amqps://`` end to end, against a RabbitMQ node that speaks only TLS.

The node is an extra node of the installed broker (``geo-tls`` on 5691, see ``rabbit_nodes``)
with ``listeners.tcp = none`` and a TLS listener whose certificate a throwaway CA, made here
with ``openssl``, signed for ``localhost``. It verifies a client certificate when one is offered
(``verify_peer``) and accepts clients without one. The system broker on 5672 is not touched.

The TLS settings travel in the broker URL's query, as aiormq reads them: ``cafile`` (the CA the
server's certificate must chain to), ``certfile`` and ``keyfile`` (a client certificate).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

import pytest

from bangui_geo.testing import (
    REPO_ROOT,
    ServiceGroup,
    ServiceProcess,
    async_poll,
    events,
    local_tcp_ports,
    public_ips,
    read_rows,
)
from bangui_geo.testing.expected import expected_row
from bangui_geo.testing.services import logged
from shared.amqp import BrokerUnreachable, connect_once
from shared.client import GeoPublisher
from tests.integration.rabbit_nodes import Node, prepare_home

pytestmark = pytest.mark.integration

COOKIE = "BANGUIGEOTLSTESTCOOKIE"
NODE_NAME = "geo-tls"
TLS_PORT = 5691
CLIENT_SUBJECT = "CN=bangui-geo-persistence"
# How RabbitMQ's TLS listener logs bytes that are no TLS record: 65 is the "A" of "AMQP".
PLAIN_ON_TLS = "{unsupported_record_type,65}"
SERVER_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature, keyEncipherment\n"
    "extendedKeyUsage = serverAuth\n"
    "subjectAltName = DNS:localhost\n"
)
CLIENT_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature\n"
    "extendedKeyUsage = clientAuth\n"
)


def openssl(directory: Path, *args: str) -> None:
    tool = shutil.which("openssl")
    assert tool, "the TLS test makes its certificates with openssl, which is not installed"
    result = subprocess.run(
        [tool, *args], cwd=directory, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str, subject: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    openssl(
        directory,
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject),
        *("-keyout", str(pair.key), "-out", str(pair.cert)),
    )
    return pair


def issue(directory: Path, name: str, subject: str, ca: KeyPair, extensions: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    request, extfile = directory / f"{name}.csr", directory / f"{name}.ext"
    extfile.write_text(extensions)
    openssl(
        directory,
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject),
        *("-keyout", str(pair.key), "-out", str(request)),
    )
    openssl(
        directory,
        *("x509", "-req", "-in", str(request), "-days", "2", "-extfile", str(extfile)),
        *("-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial", "-out", str(pair.cert)),
    )
    return pair


@dataclass(frozen=True)
class Pki:
    ca: KeyPair  # signs the server's and the persistence client's certificates
    server: KeyPair
    client: KeyPair
    other_ca: KeyPair  # a second, unrelated CA
    stranger: KeyPair  # a client certificate the other CA signed

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir()
        ca = make_ca(directory, "ca", "/CN=bangui-geo test CA")
        other = make_ca(directory, "other-ca", "/CN=bangui-geo other CA")
        return cls(
            ca=ca,
            server=issue(directory, "server", "/CN=localhost", ca, SERVER_EXTENSIONS),
            client=issue(directory, "client", f"/{CLIENT_SUBJECT}", ca, CLIENT_EXTENSIONS),
            other_ca=other,
            stranger=issue(directory, "stranger", "/CN=stranger", other, CLIENT_EXTENSIONS),
        )


def tls_config(pki: Pki) -> str:
    return (
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{TLS_PORT}\n"
        f"ssl_options.cacertfile = {pki.ca.cert}\n"
        f"ssl_options.certfile = {pki.server.cert}\n"
        f"ssl_options.keyfile = {pki.server.key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )


@dataclass(frozen=True)
class TlsBroker:
    node: Node
    pki: Pki

    def url(self, scheme: str = "amqps", **files: Path) -> str:
        """guest on ``localhost`` (the name the server certificate carries), TLS files in the
        query, e.g. ``url(cafile=...)``."""
        query = "&".join(f"{name}={quote(str(path), safe='/')}" for name, path in files.items())
        base = f"{scheme}://guest:guest@localhost:{self.node.port}/"
        return f"{base}?{query}" if query else base

    @property
    def log(self) -> Path:
        return self.node.home / "log" / f"{self.node.nodename}.log"

    def logged_since(self, offset: int, text: str) -> bool:
        """``text`` is in the node's log after its first ``offset`` bytes."""
        with self.log.open("rb") as file:
            file.seek(offset)
            return text in file.read().decode(errors="replace")

    @property
    def endpoint(self) -> str:
        """How the services' logs name this broker (``shared.amqp.connection._endpoint``)."""
        return f"localhost:{self.node.port}/"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    home = tmp_path_factory.mktemp("rabbit-tls")
    pki = Pki.create(home / "pki")
    prepare_home(home, COOKIE)
    node = Node(NODE_NAME, TLS_PORT, home, config=tls_config(pki))
    node.assert_not_running()
    try:
        node.start()
        node.wait_started()
        yield TlsBroker(node, pki)
    finally:
        node.stop()


async def test_services_and_publishers_work_over_amqps(
    tls_broker: TlsBroker, service_group: ServiceGroup
) -> None:
    pki = tls_broker.pki
    url = tls_broker.url(cafile=pki.ca.cert)
    with_client_cert = tls_broker.url(
        cafile=pki.ca.cert, certfile=pki.client.cert, keyfile=pki.client.key
    )
    db_path = service_group.db_path
    services: dict[str, ServiceProcess] = {}
    for name in ("persistence", "resolver", "timer"):
        services[name] = service_group.start(
            name, amqp_url=with_client_cert if name == "persistence" else url
        )
    await logged(services["persistence"], "persistence_ready", "persistence ready", 20)
    await logged(services["resolver"], "resolver_ready", "resolver ready", 20)
    await logged(services["timer"], "timer_leading", "timer leading", 20)
    for name, process in services.items():
        (connected,) = events(process, "amqp_connected")
        assert connected["broker"] == tls_broker.endpoint, (name, connected)

    # The broker's view: every connection is TLS, and the persistence one presented the
    # client certificate its URL names (the connections are matched to the processes by
    # their local ports).
    listed = json.loads(
        await asyncio.to_thread(
            tls_broker.node.ctl,
            *("list_connections", "peer_port", "ssl", "ssl_protocol", "peer_cert_subject"),
            *("--formatter", "json"),
        )
    )
    assert listed, "the broker lists no connection"
    assert all(c["ssl"] is True for c in listed), listed
    for name, process in services.items():
        assert process.process is not None
        ports = local_tcp_ports(process.process.pid)
        mine = [c for c in listed if c["peer_port"] in ports]
        assert len(mine) == 1, (name, ports, listed)
        assert mine[0]["ssl_protocol"] in ("tlsv1.2", "tlsv1.3"), mine
        subject = CLIENT_SUBJECT if name == "persistence" else ""
        assert mine[0]["peer_cert_subject"] == subject, (name, mine)

    ips = public_ips(600, seed=8)
    by_cli, by_client = ips[:300], ips[300:]
    # The CLI, given the URL as --amqp-url (its environment names a dead broker).
    cli_env = service_group.env_for("amqp://guest:guest@127.0.0.1:1/")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "publish", "--amqp-url", url, *by_cli],
        cwd=REPO_ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "published 300 IPs as ip.seen" in done.stdout, done.stdout
    # shared.client, with a client certificate.
    async with GeoPublisher.connect(with_client_cert, connect_timeout=5) as geo:
        assert await geo.publish_seen(by_client, source="tls-test") == 300

    expected = {ip: expected_row(ip) for ip in ips}

    def complete() -> bool:
        rows = read_rows(db_path)
        return {ip: (r[0], r[1], r[5]) for ip, r in rows.items()} == expected

    await async_poll(complete, deadline_s=20, interval=0.25, what="600 rows over TLS")
    for name, process in services.items():
        assert process.stop() == 0, name


async def refusal(url: str) -> str:
    """Why a tool's connect to ``url`` fails (it must)."""
    try:
        connection = await connect_once(url, connect_timeout=5)
    except BrokerUnreachable as exc:
        return str(exc)
    await connection.close()
    raise AssertionError(f"{url} was accepted")


async def test_plain_amqp_and_untrusted_certificates_are_refused(tls_broker: TlsBroker) -> None:
    pki = tls_broker.pki
    good = await connect_once(tls_broker.url(cafile=pki.ca.cert), connect_timeout=5)
    await good.close()  # the refusals below are about TLS, not about the broker being away

    # (case, URL, what the client's error says, what the broker's log says); with TLS 1.3 a
    # refused client certificate may reach the client as the alert or as a reset connection.
    refused = [
        ("plain AMQP on the TLS port", tls_broker.url("amqp"), ("",), PLAIN_ON_TLS),
        (
            "no CA given: the system's trust store does not know the test CA",
            tls_broker.url(),
            ("CERTIFICATE_VERIFY_FAILED",),
            None,
        ),
        (
            "a CA that did not sign the server's certificate",
            tls_broker.url(cafile=pki.other_ca.cert),
            ("CERTIFICATE_VERIFY_FAILED",),
            None,
        ),
        (
            "a client certificate from a CA the broker does not trust",
            tls_broker.url(
                cafile=pki.ca.cert, certfile=pki.stranger.cert, keyfile=pki.stranger.key
            ),
            ("UNKNOWN_CA", "Connection reset"),
            "generated SERVER ALERT: Fatal - Unknown CA",
        ),
    ]
    for case, url, reasons, broker_says in refused:
        logged_before = tls_broker.log.stat().st_size
        message = await refusal(url)
        assert any(reason in message for reason in reasons), (case, message)
        # The message names the broker with the password hidden and the TLS query intact.
        shown = url.replace("guest:guest@", "guest:***@")
        assert f"cannot connect to the broker at {shown}: " in message, (case, message)
        if broker_says is not None:
            await async_poll(
                partial(tls_broker.logged_since, logged_before, broker_says),
                deadline_s=5,
                what=f"{broker_says!r} in the broker's log ({case})",
            )


async def test_a_service_given_the_wrong_ca_says_so_instead_of_hanging(
    tls_broker: TlsBroker, service_group: ServiceGroup
) -> None:
    url = tls_broker.url(cafile=tls_broker.pki.other_ca.cert)
    resolver = service_group.start("resolver", amqp_url=url)

    # The first attempt fails at the handshake at once (not after the 10 s connect
    # timeout), and the log line says why; the service keeps to its bounded retries.
    def verify_failures() -> list[str]:
        return [
            str(e.get("error"))
            for e in events(resolver, "amqp_connect_failed")
            if "CERTIFICATE_VERIFY_FAILED" in str(e.get("error"))
        ]

    failures = await async_poll(
        verify_failures, deadline_s=8, what="amqp_connect_failed naming the certificate"
    )
    assert "certificate verify failed" in failures[0], failures[0]
    assert not events(resolver, "amqp_connected")
    assert resolver.running, "the service gave up at once instead of retrying"
