"""Tests for orbcast.keys: identity files, the public key text form, the allowlist and
pins formats, allowlist diffs for revocation, and the `plant keys` commands."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from orbcast import keys as K
from orbcast.errors import ConfigError
from orbcast.ratchet import public_from_private
from plant.cli import main as plant_main


def kg(label: bytes = b"k"):  # type: ignore[no-untyped-def]
    n = iter(range(10**6))
    return lambda: hashlib.sha256(label + next(n).to_bytes(4, "big")).digest()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --- public key text ----------------------------------------------------------------------


def test_public_text_round_trip_and_forms() -> None:
    ident = K.Identity.generate(kg())
    text = K.format_public(ident.public)
    assert text.startswith("orbcast1:") and len(text) == len("orbcast1:") + 43
    assert K.parse_public(text) == ident.public
    assert K.parse_public(f"  {text}\n") == ident.public
    assert K.parse_public(ident.public.hex()) == ident.public
    assert len(K.fingerprint(ident.public)) == 16
    assert "private" not in repr(ident) and ident.private.hex() not in repr(ident)


@pytest.mark.parametrize("bad", ["", "orbcast1:", "orbcast1:abc", "orbcast2:" + "A" * 43,
                                 "orbcast1:" + "A" * 42 + "=", "orbcast1:" + "A" * 42 + "B",
                                 "ab" * 31, "zz" * 32, "ssh-ed25519 AAAA"])
def test_parse_public_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        K.parse_public(bad)


# --- identity files ---------------------------------------------------------------------------


def test_generate_writes_0600_key_and_pub_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ident, key, pub = K.generate_identity_file(tmp_path / "keys", keygen=kg())
    assert mode(key) == 0o600 and mode(tmp_path / "keys") == 0o700
    assert pub.read_text() == ident.public_text + "\n"
    lines = key.read_text().splitlines()
    assert lines[0] == K.PRIVATE_HEADER and len(lines) == 2
    assert K.load_identity(key) == ident
    assert public_from_private(K.load_identity(key).private) == ident.public
    with pytest.raises(FileExistsError, match="already exists"):
        K.generate_identity_file(tmp_path / "keys", keygen=kg(b"other"))
    assert K.load_identity(key) == ident  # untouched
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["identity.key", "identity.pub"]


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660, 0o620, 0o601])
def test_load_refuses_group_or_world_accessible_files(tmp_path: Path, bits: int) -> None:
    _, key, _ = K.generate_identity_file(tmp_path, keygen=kg())
    os.chmod(key, bits)
    with pytest.raises(PermissionError) as info:
        K.load_identity(key)
    msg = str(info.value)
    assert str(key) in msg and f"chmod 600 {key}" in msg and f"{bits:04o}" in msg
    os.chmod(key, 0o400)
    K.load_identity(key)


def test_load_rejects_malformed_files(tmp_path: Path) -> None:
    for content in (b"", b"orbcast-identity-v1\n", b"hello\nworld\n", b"\xff\xfe\n",
                    b"orbcast-identity-v1\n" + b"A" * 42 + b"\n", b"x" * 5000):
        p = tmp_path / "bad.key"
        K.write_private_file(p, content)
        with pytest.raises(ValueError, match="bad.key"):
            K.load_identity(p)
    with pytest.raises(FileNotFoundError):
        K.load_identity(tmp_path / "missing.key")


def test_write_private_file_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "state.bin"
    K.write_private_file(p, b"old")
    assert p.read_bytes() == b"old" and mode(p) == 0o600
    os.umask(0o000)  # even a permissive umask gives 0600
    K.write_private_file(p, b"new")
    os.umask(0o022)
    assert p.read_bytes() == b"new" and mode(p) == 0o600

    def broken_fsync(fd: int) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="EIO"):
        K.write_private_file(p, b"torn")
    monkeypatch.undo()
    assert p.read_bytes() == b"new"  # the old content survives a failed write
    assert [q.name for q in tmp_path.iterdir()] == ["state.bin"]  # no temp file left
    with pytest.raises(FileExistsError):
        K.write_private_file(p, b"x", overwrite=False)


# --- allowlist ---------------------------------------------------------------------------------


def _allowlist_text(*entries: tuple[str, bytes, str]) -> str:
    return "\n".join(f'[[plant]]\nname = "{n}"\nkey = "{K.format_public(k)}"\n{extra}\n'
                     for n, k, extra in entries)


def _keys(n: int) -> list[bytes]:
    g = kg(b"acl")
    return [K.Identity.generate(g).public for _ in range(n)]


def test_allowlist_parse_and_queries(tmp_path: Path) -> None:
    a, b, c = _keys(3)
    p = tmp_path / "allowlist.toml"
    p.write_text(_allowlist_text(
        (("kitchen", a, 'publish = ["sensors/kitchen/"]\nread = ["commands/kitchen/", ""]')),
        ("garage", b, 'publish = ["sensors/garage/"]'),
    ))
    acl = K.load_allowlist(p)
    assert len(acl) == 2 and a in acl and c not in acl
    assert acl.lookup(a).name == "kitchen" and acl.lookup(c) is None  # type: ignore[union-attr]
    assert acl.may_publish(a, "sensors/kitchen/temp") and not acl.may_publish(a, "sensors/garage/x")
    assert acl.may_read(a, "anything") and not acl.may_read(b, "sensors/garage/x")
    assert not acl.may_publish(c, "sensors/kitchen/temp") and not acl.may_read(c, "x")
    assert acl.lookup(a).gets_broadcast_key and not acl.lookup(b).gets_broadcast_key  # type: ignore[union-attr]
    # a plant with narrower read prefixes never gets the group key (it opens every topic)
    narrow = K.AllowEntry(name="n", key=c, read=("sensors/",))
    assert narrow.may_read("sensors/x") and not narrow.gets_broadcast_key
    assert len(K.parse_allowlist("")) == 0


@pytest.mark.parametrize(("text", "needle"), [
    ('[[plant]]\nname = "a"\nkey = "orbcast1:nope"\n', "plant #1 'a' (line 1)"),
    ('[[plant]]\nname = "a"\n', "missing ['key']"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\nwrite = []\n', "unknown key(s) ['write']"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\n\n[[plant]]\nname = "b"\nkey = "{k0}"\n',
     "plant #2 'b' (line 5): has the same key as plant #1 'a' (line 1)"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\n[[plant]]\nname = "a"\nkey = "{k1}"\n',
     "same name"),
    ('[[plant]]\nname = "has space"\nkey = "{k0}"\n', "producer id"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\npublish = "sensors/"\n', "publish must be a list"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\nread = [1]\n', "not a string"),
    ('[[plant]]\nname = "a"\nkey = "{k0}"\nread = ["\\u0001"]\n', "control characters"),
    ('plant = 3\n', "array of tables"),
    ('[plant]\nname = "a"\n', "array of tables"),
    ('nodes = []\n', "unknown top-level"),
    ('[[plant]\n', "not valid TOML"),
])
def test_allowlist_errors_name_the_entry(tmp_path: Path, text: str, needle: str) -> None:
    k0, k1 = _keys(2)
    p = tmp_path / "acl.toml"
    p.write_text(text.replace("{k0}", K.format_public(k0)).replace("{k1}", K.format_public(k1)))
    with pytest.raises(ConfigError) as info:
        K.load_allowlist(p)
    assert needle in str(info.value) and str(p) in str(info.value)


def test_allowlist_diff_for_revocation() -> None:
    a, b, c, d = _keys(4)
    old = K.Allowlist([K.AllowEntry(name="a", key=a, read=("",)),
                       K.AllowEntry(name="b", key=b, read=("x/", "")),
                       K.AllowEntry(name="c", key=c, publish=("p/",)),
                       K.AllowEntry(name="d", key=d, read=("",))])
    new = K.Allowlist([K.AllowEntry(name="a", key=a, read=("",)),
                       K.AllowEntry(name="b", key=b, read=("x/",)),  # narrowed: no next key
                       K.AllowEntry(name="c", key=c, publish=("p/", "q/")),
                       K.AllowEntry(name="e", key=_keys(5)[4])])
    diff = old.diff(new)
    assert diff.revoked == {d} and diff.changed == {b, c} and len(diff.added) == 1
    assert diff.lost_broadcast == {b, d} and diff.rotate and not diff.empty
    assert old.diff(old).empty and not old.diff(old).rotate
    # adding a plant or widening publish needs no rotation
    assert not K.Allowlist([K.AllowEntry(name="c", key=c)]).diff(
        K.Allowlist([K.AllowEntry(name="c", key=c, publish=("p/",))])).rotate


# --- pins ---------------------------------------------------------------------------------------


def test_pins(tmp_path: Path) -> None:
    a, b = _keys(2)
    p = tmp_path / "pins.toml"
    p.write_text(f'[[node]]\nname = "seq-a"\nkey = "{K.format_public(a)}"\n'
                 f'[[node]]\nname = "seq-b"\nkey = "{b.hex()}"\n')
    pins = K.load_pins(p)
    assert pins.is_pinned(a) and b in pins and len(pins) == 2
    assert pins.lookup(b).name == "seq-b"  # type: ignore[union-attr]
    assert not pins.is_pinned(bytes(32))
    for bad, needle in [("", "no [[node]]"), ('[[node]]\nname = "x"\n', "exactly the keys"),
                        (f'[[node]]\nname = "x"\nkey = "{K.format_public(a)}"\n' * 2, "twice")]:
        p.write_text(bad)
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
            K.load_pins(p)


# --- the CLI ------------------------------------------------------------------------------------


def test_plant_keys_generate_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "id"
    assert plant_main(["keys", "generate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (out / "identity.pub").read_text().strip()
    assert mode(out / "identity.key") == 0o600
    assert plant_main(["keys", "show", "--key", str(out / "identity.key")]) == 0
    assert capsys.readouterr().out.strip() == printed
    assert K.parse_public(printed) == K.load_identity(out / "identity.key").public
    assert plant_main(["keys", "generate", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    os.chmod(out / "identity.key", 0o644)
    assert plant_main(["keys", "show", "--key", str(out / "identity.key")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plant: error:") and "chmod 600" in err and "Traceback" not in err


def test_plant_keys_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert plant_main(["keys", "generate"]) == 0
    assert (tmp_path / "orbcast" / "identity.key").exists()
    assert plant_main(["keys", "show"]) == 0
