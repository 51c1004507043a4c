"""Keys made at the hospital, certificates made at the coordinator (``fedlsc keys/certs``)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlsc_tools.certs import CertificateError, certificate_names, make_certificates, make_key_pair
from fedlsc_tools.cli import main
from fedlsc_tools.loopback import main as loopback_main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_keys_in(folder: Path) -> list[Path]:
    """Every file below ``folder`` that holds a private key of any format."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and b"PRIVATE KEY-----" in p.read_bytes())


def test_keys_at_the_hospital_are_openssh_ecdsa_and_private_is_0600(tmp_path):
    assert main(["keys", str(tmp_path / "site"), "--name", "hospital-1"]) == 0
    private, public = tmp_path / "site" / "hospital-1", tmp_path / "site" / "hospital-1.pub"
    assert mode(private) == 0o600 and mode(public) == 0o644
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    text = public.read_text()
    assert text.startswith("ecdsa-sha2-nistp384 ") and text.strip().endswith(" hospital-1")
    assert serialization.load_ssh_public_key(text.encode()) == key.public_key()
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["hospital-1",
                                                                     "hospital-1.pub"]


def test_an_existing_key_is_kept(tmp_path):
    first = make_key_pair(tmp_path, "hospital-2").read_bytes()
    (tmp_path / "hospital-2.pub").unlink()
    assert make_key_pair(tmp_path, "hospital-2").read_bytes() == first
    again = serialization.load_ssh_public_key((tmp_path / "hospital-2.pub").read_bytes())
    assert again == serialization.load_ssh_private_key(first, None).public_key()


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "-x"])
def test_key_names_must_be_plain_file_names(tmp_path, name):
    with pytest.raises(CertificateError, match="plain file name"):
        make_key_pair(tmp_path, name)


def test_not_a_key_is_refused_not_overwritten(tmp_path):
    (tmp_path / "hospital-1").write_text("hello")
    with pytest.raises(CertificateError, match="hospital-1 exists but is not"):
        make_key_pair(tmp_path, "hospital-1")
    assert (tmp_path / "hospital-1").read_text() == "hello"


def test_coordinator_certs_hold_no_hospital_key_and_private_files_are_0600(tmp_path, capsys):
    assert main(["certs", str(tmp_path), "--name", "coordinator.example.org",
                 "--ip", "10.0.0.5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server.key",
                                                          "server.pem"]
    assert private_keys_in(tmp_path) == [tmp_path / "ca.key", tmp_path / "server.key"]
    assert mode(tmp_path / "ca.key") == mode(tmp_path / "server.key") == 0o600
    assert mode(tmp_path / "ca.crt") == 0o644
    assert certificate_names(tmp_path / "server.pem") == ["coordinator.example.org",
                                                          "10.0.0.5"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert "new CA" in capsys.readouterr().out


def test_rerunning_certs_keeps_the_ca_and_adds_a_name(tmp_path, capsys):
    make_certificates(tmp_path, names=["coordinator.example.org"], ips=[])
    ca_before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()
    server_before = (tmp_path / "server.pem").read_bytes()
    assert main(["certs", str(tmp_path), "--name", "fl.example.org"]) == 0
    captured = capsys.readouterr()
    assert "kept the CA" in captured.out
    assert "also covered coordinator.example.org" in captured.err  # dropped names are named
    assert ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()) == ca_before
    assert (tmp_path / "server.pem").read_bytes() != server_before
    assert certificate_names(tmp_path / "server.pem") == ["fl.example.org"]
    ca = x509.load_pem_x509_certificate(ca_before[0])
    x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()
                                   ).verify_directly_issued_by(ca)  # the hospitals' ca.crt


def test_a_half_ca_is_an_error_naming_the_files(tmp_path):
    make_certificates(tmp_path, names=["a"], ips=[])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertificateError, match=r"ca\.crt exists but .*ca\.key does not"):
        make_certificates(tmp_path, names=["a"], ips=[])
    assert main(["certs", str(tmp_path / "none")]) == 2  # neither --name nor --ip
    assert main(["certs", str(tmp_path / "bad"), "--ip", "300.1.2.3"]) == 2


def test_loopback_certs_split_coordinator_and_hospitals(tmp_path):
    assert loopback_main(["certs", str(tmp_path), "--sites", "2"]) == 0
    coordinator = tmp_path / "coordinator"
    assert private_keys_in(coordinator) == [coordinator / "ca.key", coordinator / "server.key"]
    assert set(certificate_names(coordinator / "server.pem")) == {"localhost", "superlink",
                                                                  "127.0.0.1"}
    for k in (1, 2):
        folder = tmp_path / f"hospital-{k}"
        assert sorted(p.name for p in folder.iterdir()) == [f"hospital-{k}",
                                                            f"hospital-{k}.pub"]
        assert mode(folder / f"hospital-{k}") == 0o600
