"""fedtune.runtime.flower.credentials (TLS CA + server certificate, SuperNode keys) and the TLS pre-check."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key  # noqa: E402

from fedtune.config import ConfigError, Experiment  # noqa: E402
from fedtune.runtime.flower.credentials import (  # noqa: E402
    CredentialsError,
    main,
    make_node_keys,
    make_tls_certificates,
)
from fedtune.runtime.flower.launch import check_plain, check_tls  # noqa: E402


def _serve_tls_once(context: ssl.SSLContext | None) -> tuple[int, threading.Thread]:
    """A one-connection server on 127.0.0.1 (TLS with ``context``, plain bytes when None)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)

    def serve() -> None:
        with sock:
            conn, _ = sock.accept()
            with conn:
                try:
                    if context is None:
                        conn.recv(100)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    else:
                        with context.wrap_socket(conn, server_side=True):
                            pass
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock.getsockname()[1], thread


def test_tls_certificates_chain_and_name_localhost(tmp_path):
    """The server certificate is signed by the CA, names localhost/127.0.0.1 and extra hosts; keys are 0600."""
    files = make_tls_certificates(tmp_path, hosts=["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert files.ca_key.stat().st_mode & 0o777 == 0o600 and files.server_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(CredentialsError, match="exist"):
        make_tls_certificates(tmp_path)  # never overwrites
    with pytest.raises(CredentialsError, match="neither an IP address nor a DNS name"):
        make_tls_certificates(tmp_path / "x", hosts=["bad host"])


def test_node_keys_are_flower_keys(tmp_path):
    """Private keys load as Flower's SuperNode does; public keys pass `flwr supernode register`'s check."""
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_node_keys(tmp_path, ["a", "b"])
    for pair in keys.values():
        assert load_ssh_private_key(pair.private_key.read_bytes(), None).curve.name == "secp384r1"
        assert try_load_public_key(pair.public_key).startswith(b"-----BEGIN PUBLIC KEY-----")
    assert keys["a"].public_key.read_bytes() != keys["b"].public_key.read_bytes()
    with pytest.raises(CredentialsError, match="repeat"):
        make_node_keys(tmp_path / "y", ["a", "a"])
    with pytest.raises(CredentialsError, match="cannot be file names"):
        make_node_keys(tmp_path / "y", ["../a"])


def test_command_line(tmp_path, capsys):
    """``python -m fedtune.runtime.flower.credentials`` prints the Flower flags to use; errors exit 2."""
    assert main(["tls", str(tmp_path / "certs")]) == 0
    assert "--ssl-certfile" in capsys.readouterr().out
    assert main(["node-keys", str(tmp_path / "keys"), "site_a"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["tls", str(tmp_path / "certs")])
    assert exc.value.code == 2


def test_check_tls_names_the_setting(tmp_path):
    """The pre-submit checks accept our CA (TLS) or an HTTP answer (insecure), and name runtime.* otherwise."""
    files = make_tls_certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.server_cert, files.server_key)

    port, thread = _serve_tls_once(server)
    check_tls(f"127.0.0.1:{port}", str(files.ca_cert), timeout=5)
    thread.join(5)
    port, thread = _serve_tls_once(server)
    with pytest.raises(ConnectionError, match="not trusted by the system CAs.*runtime.root_certificates"):
        check_tls(f"127.0.0.1:{port}", "", timeout=5)
    thread.join(5)
    port, thread = _serve_tls_once(None)
    with pytest.raises(ConnectionError, match="runtime.insecure = true"):
        check_tls(f"127.0.0.1:{port}", str(files.ca_cert), timeout=5)
    thread.join(5)
    port, thread = _serve_tls_once(None)
    check_plain(f"127.0.0.1:{port}", timeout=5)  # an HTTP answer: fine for runtime.insecure = true
    thread.join(5)
    port, thread = _serve_tls_once(server)
    with pytest.raises(ConnectionError, match="probably serves TLS"):
        check_plain(f"127.0.0.1:{port}", timeout=5)
    thread.join(5)
    with pytest.raises(ConnectionError, match="no such file"):
        check_tls("127.0.0.1:1", str(tmp_path / "missing.crt"))


def test_insecure_with_root_certificates_is_refused():
    """runtime.insecure = true and runtime.root_certificates contradict each other."""
    with pytest.raises(ConfigError, match="runtime.root_certificates"):
        Experiment.from_overrides(["runtime.insecure=true", 'runtime.root_certificates="ca.crt"'])
