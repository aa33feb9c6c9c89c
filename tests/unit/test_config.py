"""Tests of orbcast.config: defaults, TOML, ORBCAST_* environment, explicit overrides,
and the errors that name the field and where the bad value came from.

Every call passes ``env=`` explicitly so the developer's own environment never leaks in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orbcast.config import (
    PlantConfig,
    SequencerConfig,
    endpoint_host,
    is_loopback_endpoint,
    load,
)
from orbcast.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "orbcast.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- defaults ------------------------------------------------------------------------------

def test_defaults_are_valid_and_loopback() -> None:
    s = load(SequencerConfig, env={})
    assert s == SequencerConfig(node_id=s.node_id)
    assert (s.ingress, s.egress, s.security, s.role) == (
        "tcp://127.0.0.1:7400", "tcp://127.0.0.1:7401", "none", "primary")
    assert is_loopback_endpoint(s.ingress) and is_loopback_endpoint(s.egress)
    assert s.fsync is True and s.heartbeat_ms == 100
    p = load(PlantConfig, env={})
    assert p.sequencers == ["tcp://127.0.0.1:7400"]
    assert p.replay_credit == 4 and p.fsync is True


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    # the bridge's own sections are another program's business (checked by its loader)
    path = write(tmp_path, "# nothing\n[bridge]\nx = 1\n")
    assert load(SequencerConfig, path, env={}, overrides={"node_id": "n"}) == SequencerConfig(node_id="n")


# --- file, environment, overrides ---------------------------------------------------------

FILE = """
[sequencer]
data = "/srv/orbcast"
node_id = "seq-a"
heartbeat_ms = 50
fsync = false
replay_idle_s = 12.5
fault_drop_egress = 0.25
retention_days = 3

[plant]
sequencers = ["tcp://127.0.0.1:7400", "tcp://127.0.0.2:7400"]
producer_id = "kitchen"
replay_credit = 8
"""


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    s = load(SequencerConfig, path, env={})
    assert (s.data, s.node_id, s.heartbeat_ms, s.fsync, s.replay_idle_s, s.fault_drop_egress,
            s.retention_days) == ("/srv/orbcast", "seq-a", 50, False, 12.5, 0.25, 3)
    p = load(PlantConfig, path, env={})
    assert p.sequencers == ["tcp://127.0.0.1:7400", "tcp://127.0.0.2:7400"]
    assert (p.producer_id, p.replay_credit) == ("kitchen", 8)


def test_the_file_may_be_named_by_orbcast_config(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    assert load(SequencerConfig, env={"ORBCAST_CONFIG": str(path)}).node_id == "seq-a"
    # an explicit path wins over ORBCAST_CONFIG
    other = write(tmp_path, '[sequencer]\nnode_id = "seq-b"\n', "other.toml")
    assert load(SequencerConfig, other, env={"ORBCAST_CONFIG": str(path)}).node_id == "seq-b"


def test_env_wins_over_file_and_overrides_win_over_env(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    env = {"ORBCAST_SEQUENCER_HEARTBEAT_MS": "70", "ORBCAST_SEQUENCER_NODE_ID": "from-env",
           "ORBCAST_SEQUENCER_FSYNC": "yes"}
    s = load(SequencerConfig, path, env=env)
    assert (s.heartbeat_ms, s.node_id, s.fsync) == (70, "from-env", True)
    assert s.retention_days == 3                                   # untouched file value
    s = load(SequencerConfig, path, env=env, overrides={"node_id": "from-cli", "heartbeat_ms": None})
    assert s.node_id == "from-cli"
    assert s.heartbeat_ms == 70                                    # None overrides are ignored


def test_env_of_the_other_section_is_ignored() -> None:
    s = load(SequencerConfig, env={"ORBCAST_PLANT_REPLAY_CREDIT": "9", "ORBCAST_OTHER": "x",
                                   "ORBCAST_SEQUENCER_ROLE": "standby"})
    assert s.role == "standby"


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False)])
def test_env_booleans(text: str, value: bool) -> None:
    assert load(SequencerConfig, env={"ORBCAST_SEQUENCER_FSYNC": text}).fsync is value


@pytest.mark.parametrize("text,expected", [
    ("tcp://a:7400,tcp://b:7400", ["tcp://a:7400", "tcp://b:7400"]),
    (" tcp://a:7400 , tcp://b:7401 ", ["tcp://a:7400", "tcp://b:7401"]),
    ("tcp://a:7400,,", ["tcp://a:7400"]),
    ("tcp://[::1]:7400", ["tcp://[::1]:7400"]),
])
def test_plant_sequencers_list_from_env(text: str, expected: list[str]) -> None:
    assert load(PlantConfig, env={"ORBCAST_PLANT_SEQUENCERS": text}).sequencers == expected


def test_plant_sequencers_errors_from_env() -> None:
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env={"ORBCAST_PLANT_SEQUENCERS": " , "})
    assert ei.value.field == "plant.sequencers" and "at least one" in str(ei.value)
    assert ei.value.source == "ORBCAST_PLANT_SEQUENCERS"
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env={"ORBCAST_PLANT_SEQUENCERS": "tcp://a:7400,udp://b:1"})
    assert ei.value.field == "plant.sequencers" and ei.value.source == "ORBCAST_PLANT_SEQUENCERS"
    assert "udp://b:1" in str(ei.value)


def test_plant_sequencers_as_a_string_when_built_directly() -> None:
    cfg = PlantConfig(sequencers="tcp://a:1, tcp://b:2")  # type: ignore[arg-type]
    assert cfg.sequencers == ["tcp://a:1", "tcp://b:2"]


# --- unknown keys --------------------------------------------------------------------------

def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[sequencer]\nheartbeat = 50\n")
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, path, env={})
    assert ei.value.field == "sequencer.heartbeat" and ei.value.source == str(path)
    assert "heartbeat" in str(ei.value) and str(path) in str(ei.value)


def test_unknown_key_in_env() -> None:
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env={"ORBCAST_PLANT_SEQUENCER": "tcp://a:1"})
    assert ei.value.field == "plant.sequencer" and ei.value.source == "ORBCAST_PLANT_SEQUENCER"


def test_unknown_key_in_overrides() -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={}, overrides={"bogus": 1})
    assert ei.value.field == "sequencer.bogus" and ei.value.source == "command line"


def test_unknown_key_of_the_other_section_is_not_checked(tmp_path: Path) -> None:
    # each loader reads only its own section
    path = write(tmp_path, "[plant]\nbogus = 1\n")
    load(SequencerConfig, path, env={})
    with pytest.raises(ConfigError):
        load(PlantConfig, path, env={})


# --- bad types and values --------------------------------------------------------------------

@pytest.mark.parametrize("line,field", [
    ('heartbeat_ms = "fast"', "sequencer.heartbeat_ms"),
    ("heartbeat_ms = 100.9", "sequencer.heartbeat_ms"),     # not silently truncated to 100
    ("heartbeat_ms = true", "sequencer.heartbeat_ms"),
    ("heartbeat_ms = 5", "sequencer.heartbeat_ms"),         # below the range
    ("heartbeat_ms = 60001", "sequencer.heartbeat_ms"),
    ('fsync = "maybe"', "sequencer.fsync"),
    ("fsync = 1", "sequencer.fsync"),
    ("role = 5", "sequencer.role"),
    ('role = "leader"', "sequencer.role"),
    ('security = "tls"', "sequencer.security"),
    ("replay_idle_s = 0", "sequencer.replay_idle_s"),
    ("replay_idle_s = -1.5", "sequencer.replay_idle_s"),
    ("replay_idle_s = nan", "sequencer.replay_idle_s"),
    ("replay_idle_s = inf", "sequencer.replay_idle_s"),
    ("replay_idle_s = true", "sequencer.replay_idle_s"),
    ("replay_idle_s = [1]", "sequencer.replay_idle_s"),
    ("fault_drop_egress = 1.0", "sequencer.fault_drop_egress"),
    ('ingress = "127.0.0.1:7400"', "sequencer.ingress"),
    ('egress = "tcp://127.0.0.1:99999"', "sequencer.egress"),
    ('advertise_egress = "tcp://host"', "sequencer.advertise_egress"),
    ('node_id = ""', "sequencer.node_id"),
    ("replay_chunk_bytes = 100", "sequencer.replay_chunk_bytes"),
    ("max_replays = 0", "sequencer.max_replays"),
])
def test_bad_file_values_name_field_and_source(tmp_path: Path, line: str, field: str) -> None:
    path = write(tmp_path, f"[sequencer]\n{line}\n")
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, path, env={})
    assert ei.value.field == field
    assert ei.value.source == str(path)
    assert field in str(ei.value) and str(path) in str(ei.value)


@pytest.mark.parametrize("var,value", [
    ("ORBCAST_SEQUENCER_HEARTBEAT_MS", "abc"),
    ("ORBCAST_SEQUENCER_HEARTBEAT_MS", "1.5"),
    ("ORBCAST_SEQUENCER_HEARTBEAT_MS", "9"),
    ("ORBCAST_SEQUENCER_REPLAY_IDLE_S", "soon"),
    ("ORBCAST_SEQUENCER_REPLAY_IDLE_S", "nan"),
    ("ORBCAST_SEQUENCER_FSYNC", "2"),
    ("ORBCAST_SEQUENCER_ROLE", "boss"),
    ("ORBCAST_SEQUENCER_EGRESS", "tcp://127.0.0.1"),
])
def test_bad_env_values_name_field_and_source(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={var: value})
    assert ei.value.field == "sequencer." + var.removeprefix("ORBCAST_SEQUENCER_").lower()
    assert ei.value.source == var and var in str(ei.value)


def test_bad_override_names_command_line() -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={}, overrides={"heartbeat_ms": "50"})
    assert ei.value.field == "sequencer.heartbeat_ms" and ei.value.source == "command line"


@pytest.mark.parametrize("line,field", [
    ("producer_id = \"has space\"", "plant.producer_id"),
    ("producer_id = \"käse\"", "plant.producer_id"),
    ("replay_credit = 65", "plant.replay_credit"),
    ("replay_credit = 0", "plant.replay_credit"),
    ("sequencers = []", "plant.sequencers"),
    ("sequencers = [1, 2]", "plant.sequencers"),
    ("sequencers = 5", "plant.sequencers"),
    ("outbox_max_bytes = 10", "plant.outbox_max_bytes"),
    ("request_timeout_ms = 1", "plant.request_timeout_ms"),
])
def test_bad_plant_values(tmp_path: Path, line: str, field: str) -> None:
    path = write(tmp_path, f"[plant]\n{line}\n")
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, path, env={})
    assert ei.value.field == field and ei.value.source == str(path)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, missing, env={})
    assert ei.value.source == str(missing)
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, tmp_path, env={})       # a directory
    assert ei.value.source == str(tmp_path)
    bad = write(tmp_path, "[sequencer\nx=", "bad.toml")
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, bad, env={})
    assert ei.value.source == str(bad) and "TOML" in str(ei.value)
    not_table = write(tmp_path, 'sequencer = "x"\n', "nt.toml")
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, not_table, env={})
    assert ei.value.source == str(not_table)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        SequencerConfig(heartbeat_ms=0)


# --- protected mode ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ingress", "egress"])
@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:7400", "tcp://*:7400", "tcp://192.168.1.5:7400",
                                "tcp://[::]:7400", "tcp://pi.local:7400", "tcp://eth0:7400"])
def test_non_loopback_bind_without_security_is_refused(name: str, ep: str) -> None:
    var = f"ORBCAST_SEQUENCER_{name.upper()}"
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={var: ep})
    msg = str(ei.value)
    assert ei.value.field == f"sequencer.{name}" and ei.value.source == var
    assert ep in msg and "without link security" in msg and "loopback" in msg


def test_the_peer_bind_is_protected_too_once_a_peer_is_configured() -> None:
    env = {"ORBCAST_SEQUENCER_PEER": "tcp://0.0.0.0:7402"}
    load(SequencerConfig, env=env)                       # no peer_connect: peer is unused
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={**env, "ORBCAST_SEQUENCER_PEER_CONNECT": "tcp://127.0.0.1:7502"})
    assert ei.value.field == "sequencer.peer" and "without link security" in str(ei.value)


def test_an_unknown_security_mode_is_refused() -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={"ORBCAST_SEQUENCER_SECURITY": "tls"})
    assert ei.value.field == "sequencer.security"
    assert ei.value.source == "ORBCAST_SEQUENCER_SECURITY"
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env={"ORBCAST_PLANT_SECURITY": "tls"})
    assert ei.value.field == "plant.security"


@pytest.mark.parametrize("missing", ["identity", "allowlist"])
def test_ratchet_needs_an_identity_and_an_allowlist(missing: str) -> None:
    env = {"ORBCAST_SEQUENCER_SECURITY": "ratchet", "ORBCAST_SEQUENCER_IDENTITY": "/k/node.key",
           "ORBCAST_SEQUENCER_ALLOWLIST": "/k/allow.toml"}
    del env[f"ORBCAST_SEQUENCER_{missing.upper()}"]
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env=env)
    assert ei.value.field == f"sequencer.{missing}"


@pytest.mark.parametrize("missing", ["identity", "pins"])
def test_a_ratchet_plant_needs_an_identity_and_pins(missing: str) -> None:
    env = {"ORBCAST_PLANT_SECURITY": "ratchet", "ORBCAST_PLANT_IDENTITY": "/k/id.key",
           "ORBCAST_PLANT_PINS": "/k/pins.toml"}
    del env[f"ORBCAST_PLANT_{missing.upper()}"]
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env=env)
    assert ei.value.field == f"plant.{missing}"


def test_with_link_security_a_node_may_bind_any_address() -> None:
    cfg = load(SequencerConfig, env={
        "ORBCAST_SEQUENCER_SECURITY": "ratchet", "ORBCAST_SEQUENCER_IDENTITY": "/k/node.key",
        "ORBCAST_SEQUENCER_ALLOWLIST": "/k/allow.toml", "ORBCAST_SEQUENCER_INGRESS": "tcp://0.0.0.0:7400",
        "ORBCAST_SEQUENCER_EGRESS": "tcp://192.0.2.1:7401"})
    assert cfg.ingress == "tcp://0.0.0.0:7400" and cfg.security == "ratchet"


def test_a_secured_pair_needs_the_peer_key_and_a_valid_one() -> None:
    env = {"ORBCAST_SEQUENCER_SECURITY": "ratchet", "ORBCAST_SEQUENCER_IDENTITY": "/k/node.key",
           "ORBCAST_SEQUENCER_ALLOWLIST": "/k/allow.toml", "ORBCAST_SEQUENCER_PEER": "tcp://0.0.0.0:7402",
           "ORBCAST_SEQUENCER_PEER_CONNECT": "tcp://192.0.2.2:7402"}
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env=env)
    assert ei.value.field == "sequencer.peer_key"
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={**env, "ORBCAST_SEQUENCER_PEER_KEY": "orbcast1:short"})
    assert ei.value.field == "sequencer.peer_key"
    key = "orbcast1:" + "A" * 43
    assert load(SequencerConfig, env={**env, "ORBCAST_SEQUENCER_PEER_KEY": key}).peer_key == key


def test_the_control_endpoint_must_be_loopback() -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={"ORBCAST_SEQUENCER_CONTROL": "tcp://0.0.0.0:7403"})
    assert ei.value.field == "sequencer.control" and "loopback" in str(ei.value)
    assert load(SequencerConfig, env={"ORBCAST_SEQUENCER_CONTROL": "tcp://127.0.0.1:7403"}).control


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:7400", "tcp://127.1.2.3:1", "tcp://localhost:7400",
                                "tcp://[::1]:7400"])
def test_loopback_binds_are_allowed(ep: str) -> None:
    assert load(SequencerConfig, env={"ORBCAST_SEQUENCER_INGRESS": ep}).ingress == ep


def test_failover_timing_must_be_consistent() -> None:
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={"ORBCAST_SEQUENCER_HEARTBEAT_MS": "300"})    # failover 500 < 600
    assert ei.value.field == "sequencer.failover_ms"
    assert "heartbeat_ms" in str(ei.value) and "failover_ms" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load(SequencerConfig, env={"ORBCAST_SEQUENCER_SOLO_AFTER_MS": "999"})   # < 2 x 500
    assert ei.value.field == "sequencer.solo_after_ms" and "failover_ms" in str(ei.value)
    ok = load(SequencerConfig, env={"ORBCAST_SEQUENCER_HEARTBEAT_MS": "250",
                                    "ORBCAST_SEQUENCER_SOLO_AFTER_MS": "1000"})
    assert (ok.heartbeat_ms, ok.failover_ms, ok.solo_after_ms) == (250, 500, 1000)


def test_advertised_egress_is_not_a_bind() -> None:
    cfg = SequencerConfig(advertise_egress="tcp://pi.local:7401", node_id="n")
    assert cfg.announced_egress == "tcp://pi.local:7401"
    assert SequencerConfig(node_id="n").announced_egress == "tcp://127.0.0.1:7401"


def test_announced_endpoints_replace_a_wildcard_host() -> None:
    cfg = SequencerConfig(node_id="n")
    cfg.egress = "tcp://0.0.0.0:7401"                    # not buildable yet (protected mode)
    cfg.ingress = "tcp://*:7400"
    assert "0.0.0.0" not in cfg.announced_egress and cfg.announced_egress.endswith(":7401")
    assert "*" not in cfg.announced_ingress and cfg.announced_ingress.endswith(":7400")


@pytest.mark.parametrize("ep,host", [("tcp://a:1", "a"), ("tcp://[::1]:7400", "::1"),
                                     ("tcp://*:65535", "*")])
def test_endpoint_host(ep: str, host: str) -> None:
    assert endpoint_host(ep) == host


@pytest.mark.parametrize("ep", ["ipc:///tmp/x", "tcp://a", "tcp://a:0", "tcp://a:65536", "tcp://a:x", "a:1"])
def test_endpoint_host_refuses(ep: str) -> None:
    with pytest.raises(ValueError):
        endpoint_host(ep)


def test_configs_are_plain_dataclasses() -> None:
    names = {f.name for f in dataclasses.fields(SequencerConfig)}
    assert {"ingress", "egress", "security", "heartbeat_ms"} <= names


def test_ready_limit_is_configurable_and_must_leave_room_for_a_replay_chunk() -> None:
    p = load(PlantConfig, env={"ORBCAST_PLANT_READY_LIMIT": "10000"})
    assert p.ready_limit == 10_000
    assert PlantConfig().ready_limit == 65_536
    with pytest.raises(ConfigError, match="ready_limit .* twice replay_chunk_records"):
        PlantConfig(ready_limit=4096, replay_chunk_records=4096)
    PlantConfig(ready_limit=8192, replay_chunk_records=4096)


def test_the_plant_memory_bounds_in_bytes_are_configurable_and_checked() -> None:
    from orbcast.envelope import chunk_bytes
    p = load(PlantConfig, env={"ORBCAST_PLANT_READY_BYTES": str(8 << 20),
                               "ORBCAST_PLANT_GAP_BUFFER_BYTES": str(2 << 20)})
    assert (p.ready_bytes, p.gap_buffer_bytes) == (8 << 20, 2 << 20)
    assert (PlantConfig().ready_bytes, PlantConfig().gap_buffer_bytes) == (32 << 20, 16 << 20)
    least = 2 * chunk_bytes(4096)                 # twice a chunk of the default 4096 records
    PlantConfig(ready_bytes=least)
    with pytest.raises(ConfigError, match=r"ready_bytes \(\d+\) must be at least %d" % least) as e:
        PlantConfig(ready_bytes=least - 1)
    assert e.value.field == "plant.ready_bytes"
    PlantConfig(ready_bytes=2 * chunk_bytes(100), replay_chunk_records=100)   # smaller chunks
    for name, bad in (("ready_bytes", 1000), ("gap_buffer_bytes", 1000)):
        with pytest.raises(ConfigError) as e:
            PlantConfig(**{name: bad})
        assert e.value.field == f"plant.{name}"


# --- sections, TOML types, producer ids as file names ------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cls", [PlantConfig, SequencerConfig])
@pytest.mark.parametrize("section", ["plants", "Plant", "sequencers", "other"])
def test_an_unknown_section_is_refused(tmp_path: Path, cls: type, section: str) -> None:
    """A typo'd ``[plants]`` used to be skipped: every plant setting silently default."""
    path = write(tmp_path, f'[{section}]\nproducer_id = "kitchen"\n')
    with pytest.raises(ConfigError) as ei:
        load(cls, path, env={})
    assert f"unknown section [{section}]" in str(ei.value) and ei.value.source == str(path)


def test_the_bridge_sections_of_a_shared_file_are_known_and_a_typo_beside_them_is_not(
        tmp_path: Path) -> None:
    """One file holds the bridge's [plant] and its own [bridge], [[input]], ...:
    ``plant status --config /etc/orbcast/bridge.toml`` reads it (operations.md 2.4)."""
    shipped = ROOT / "systemd" / "config" / "bridge.toml"
    assert load(PlantConfig, shipped, env={}).data == "/var/lib/orbcast/bridge"
    load(SequencerConfig, shipped, env={}, overrides={"node_id": "n"})
    every = write(tmp_path, shipped.read_text() + '\n[[output]]\ntype = "LED"\npin = 5\n'
                  'topic = "actuators/led"\n\n[[serial]]\nname = "esp"\nurl = "/dev/null"\n')
    assert load(PlantConfig, every, env={}).data == "/var/lib/orbcast/bridge"
    typo = write(tmp_path, shipped.read_text() + '\n[[inputs]]\ntype = "Button"\npin = 17\n',
                 "typo.toml")
    with pytest.raises(ConfigError, match=r"unknown section \[inputs\]"):
        load(PlantConfig, typo, env={})


@pytest.mark.parametrize("section,line,field,says", [
    ("plant", 'outbox_max_count = "10"', "plant.outbox_max_count", "must be an integer"),
    ("plant", 'fsync = "yes"', "plant.fsync", "must be a boolean"),
    ("plant", "fsync = 1", "plant.fsync", "must be a boolean"),
    ("plant", 'sequencers = "tcp://127.0.0.1:7400"', "plant.sequencers", "must be a list"),
    ("plant", "producer_id = 5", "plant.producer_id", "must be a string"),
    ("plant", "request_timeout_ms = 2000.0", "plant.request_timeout_ms", "must be an integer"),
    ("plant", 'data = ["a"]', "plant.data", "must be a string"),
    ("sequencer", 'heartbeat_ms = "100"', "sequencer.heartbeat_ms", "must be an integer"),
    ("sequencer", 'require_standby = "false"', "sequencer.require_standby", "must be a boolean"),
    ("sequencer", 'replay_idle_s = "30"', "sequencer.replay_idle_s", "must be a number"),
    ("sequencer", "node_id = 7", "sequencer.node_id", "must be a string"),
])
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path: Path, section: str, line: str,
                                                   field: str, says: str) -> None:
    path = write(tmp_path, f"[{section}]\n{line}\n")
    cls = PlantConfig if section == "plant" else SequencerConfig
    with pytest.raises(ConfigError) as ei:
        load(cls, path, env={})
    assert ei.value.field == field and ei.value.source == str(path)
    assert says in str(ei.value) and field in str(ei.value)


def test_text_refused_in_the_file_is_still_converted_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[sequencer]\nreplay_idle_s = 30\nfsync = false\n"
                           "[plant]\noutbox_max_count = 10\nfsync = false\n")
    assert load(SequencerConfig, path, env={}).replay_idle_s == 30      # an integer is a number
    assert load(PlantConfig, path, env={}).outbox_max_count == 10
    text = write(tmp_path, '[plant]\noutbox_max_count = "12"\nfsync = "yes"\n', "text.toml")
    with pytest.raises(ConfigError):
        load(PlantConfig, text, env={})
    # environment variables are text: converted as before
    p = load(PlantConfig, path, env={"ORBCAST_PLANT_OUTBOX_MAX_COUNT": "12",
                                     "ORBCAST_PLANT_FSYNC": "yes"})
    assert (p.outbox_max_count, p.fsync) == (12, True)


@pytest.mark.parametrize("pid,similar", [("..", "..."), (".", ".hidden"), ("../../escape", "a..b"),
                                         ("a/b", "a.b"), ("/abs", "abs"), ("a\\b", "a_b"),
                                         ("..\\x", "x:y")])
def test_a_producer_id_must_be_usable_as_one_file_name(tmp_path: Path, pid: str,
                                                       similar: str) -> None:
    """It names the outbox directory: ``..`` put outbox.dat in the data dir itself."""
    assert PlantConfig(producer_id=similar).producer_id == similar
    with pytest.raises(ConfigError) as ei:
        PlantConfig(producer_id=pid)
    assert ei.value.field == "plant.producer_id" and "file name" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, env={"ORBCAST_PLANT_PRODUCER_ID": pid})
    assert ei.value.field == "plant.producer_id" and ei.value.source == "ORBCAST_PLANT_PRODUCER_ID"
    path = write(tmp_path, f"[plant]\nproducer_id = '{pid}'\n")
    with pytest.raises(ConfigError) as ei:
        load(PlantConfig, path, env={})
    assert ei.value.field == "plant.producer_id" and ei.value.source == str(path)


def test_a_setting_outside_any_section_is_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("fsync = true\n[plant]\n")
    with pytest.raises(ConfigError, match="setting 'fsync' is outside any section"):
        load(PlantConfig, f, env={})
