"""Settings: precedence, validation messages, DFP port syntax, and the example file."""

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from pyroute import config
from pyroute.config import (
    ListenSpec,
    Settings,
    SettingsError,
    add_setting_flags,
    load_settings,
    parse_listen_specs,
    settings_from_args,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SETTING_FIELDS = [f.name for f in dataclasses.fields(Settings) if f.name not in ("config_file", "sources")]


@pytest.fixture(autouse=True)
def no_host_resolv_conf(monkeypatch, tmp_path):
    """Keep the host's /etc/resolv.conf out of every test."""
    monkeypatch.setattr(config, "RESOLV_CONF", str(tmp_path / "absent-resolv.conf"))


def write_toml(tmp_path, text, name="pyroute.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- defaults and precedence --------------------------------------------------


def test_defaults_match_dfp():
    s = load_settings([], {})
    assert (s.port, s.ip, s.bind_address, s.service_name, s.separator) == (8080, "0.0.0.0", "0.0.0.0", "proxy", ",")
    assert s.default_ports == (ListenSpec(80), ListenSpec(443, ssl=True))
    assert s.bind_ports == ()
    assert (s.timeout_connect, s.timeout_client, s.timeout_server, s.timeout_queue, s.timeout_tunnel,
            s.timeout_http_request, s.timeout_http_keep_alive) == (5, 20, 20, 30, 3600, 5, 15)
    assert s.dns_nameservers == ("127.0.0.11",)
    assert (s.dns_ttl_cap, s.dns_timeout, s.upstream_max_idle, s.upstream_idle_timeout) == (5, 2, 64, 30)
    assert s.workers >= 1 and s.log_level == "info" and s.config_file is None
    assert dict(s.sources) == {name: "default" for name in SETTING_FIELDS}
    assert s == Settings()


def test_precedence_cli_env_file_default_per_field(tmp_path):
    path = write_toml(tmp_path, 'port = 9000\ntimeout_connect = 1.5\nlog_level = "debug"\nworkers = 3\n')
    environ = {"TIMEOUT_CONNECT": "2.5", "LOG_LEVEL": "warning", "UNRELATED": "x"}
    s = load_settings(["--config", path, "--log-level", "error"], environ)
    assert s.port == 9000                      # file beats default
    assert s.workers == 3
    assert s.timeout_connect == 2.5            # env beats file
    assert s.log_level == "error"              # cli beats env and file
    assert s.timeout_server == 20              # default
    assert s.config_file == path
    assert s.sources["port"] == "file" and s.sources["timeout_connect"] == "env"
    assert s.sources["log_level"] == "cli" and s.sources["timeout_server"] == "default"


def test_cli_beats_env_without_a_file():
    s = load_settings(["--port=9100", "--default-ports", "8000"], {"PORT": "9200", "DEFAULT_PORTS": "81"})
    assert s.port == 9100 and s.default_ports == (ListenSpec(8000),)


def test_config_file_from_env_and_cli_flag_wins(tmp_path):
    from_env = write_toml(tmp_path, "port = 1111\n", "env.toml")
    from_cli = write_toml(tmp_path, "port = 2222\n", "cli.toml")
    assert load_settings([], {"PYROUTE_CONFIG": from_env}).port == 1111
    s = load_settings(["--config", from_cli], {"PYROUTE_CONFIG": from_env})
    assert s.port == 2222 and s.config_file == from_cli


def test_only_the_winning_value_is_validated():
    assert load_settings(["--port", "1"], {"PORT": "garbage"}).port == 1


def test_flags_reusable_on_another_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    add_setting_flags(parser)
    ns = parser.parse_args(["serve", "--workers", "2"])
    s = settings_from_args(ns, {"SERVICE_NAME": "edge"})
    assert (s.workers, s.service_name) == (2, "edge")
    assert s.sources["workers"] == "cli" and s.sources["service_name"] == "env"


def test_settings_are_frozen_hashable_and_sources_do_not_affect_equality():
    a = load_settings([], {})
    b = load_settings([], {"PORT": "8080"})
    assert a == b and hash(a) == hash(b) and a.sources != b.sources
    assert "sources" not in repr(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1


# --- validation: every message names the setting ------------------------------


@pytest.mark.parametrize(
    ("env", "value", "problem"),
    [
        ("PORT", "abc", "expected an integer 0..65535, got 'abc'"),
        ("PORT", "65536", "0..65535"),
        ("PORT", "-1", "0..65535"),
        ("PORT", "80.5", "integer"),
        ("IP", "  ", "non-empty"),
        ("BIND_ADDRESS", "", "non-empty"),
        ("SERVICE_NAME", "", "non-empty"),
        ("SEPARATOR", "", "non-empty"),
        ("TIMEOUT_CONNECT", "abc", "expected a number of seconds > 0, got 'abc'"),
        ("TIMEOUT_CLIENT", "0", "> 0"),
        ("TIMEOUT_SERVER", "-3", "> 0"),
        ("TIMEOUT_QUEUE", "nan", "> 0"),
        ("TIMEOUT_TUNNEL", "inf", "> 0"),
        ("TIMEOUT_HTTP_REQUEST", "5s", "seconds"),
        ("TIMEOUT_HTTP_KEEP_ALIVE", "", "seconds"),
        ("DNS_TTL_CAP", "0", "> 0"),
        ("DNS_TIMEOUT", "x", "seconds"),
        ("UPSTREAM_MAX_IDLE", "-1", ">= 0"),
        ("ACCESS_LOG_SAMPLE", "0", "a fraction > 0 and <= 1, got '0'"),
        ("ACCESS_LOG_SAMPLE", "1.5", "fraction"),
        ("ACCESS_LOG_SAMPLE", "half", "fraction"),
        ("UPSTREAM_IDLE_TIMEOUT", "0", "> 0"),
        ("WORKERS", "0", ">= 1"),
        ("WORKERS", "two", ">= 1"),
        ("LOG_LEVEL", "verbose", "one of debug, info, warning, error"),
        ("DEFAULT_PORTS", "80,http", "'http' is not a port number"),
        ("BIND_PORTS", "99999", "not a port number"),
        ("DNS_NAMESERVERS", "", "host[:port]"),
        ("DNS_NAMESERVERS", "10.0.0.2:0", "not a port number 1..65535"),
        ("DNS_NAMESERVERS", "10.0.0.2:dns", "not a port number"),
        ("DNS_NAMESERVERS", "10.0.0.2,,10.0.0.3", "host[:port]"),
        ("DNS_NAMESERVERS", ":53", "malformed host"),
        ("DNS_NAMESERVERS", "[::1", "malformed entry"),
        ("DNS_NAMESERVERS", "[::1]53", "malformed entry"),
    ],
)
def test_env_validation_error_names_the_setting(env, value, problem):
    with pytest.raises(SettingsError) as err:
        load_settings([], {env: value})
    message = str(err.value)
    assert message.startswith(f"{env}: ") and problem in message and "\n" not in message


def test_cli_error_names_the_flag():
    with pytest.raises(SettingsError, match=r"^--timeout-connect: expected a number of seconds > 0, got 'abc'$"):
        load_settings(["--timeout-connect", "abc"], {})


def test_file_error_names_the_key_and_file(tmp_path):
    path = write_toml(tmp_path, "workers = 0\n")
    with pytest.raises(SettingsError, match=rf"^workers \(in {re.escape(path)}\): expected an integer >= 1, got 0$"):
        load_settings(["--config", path], {})


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ("port = 80.0", "port"),
        ("port = true", "port"),
        ("timeout_connect = false", "timeout_connect"),
        ("timeout_connect = [1]", "timeout_connect"),
        ("access_log_sample = true", "access_log_sample"),
        ("default_ports = true", "default_ports"),
        ("default_ports = [80, true]", "default_ports"),
        ("dns_nameservers = [53]", "dns_nameservers"),
        ("dns_nameservers = []", "dns_nameservers"),
        ("log_level = 1", "log_level"),
        ("separator = 1", "separator"),
    ],
)
def test_file_wrong_types_rejected(tmp_path, toml, setting):
    path = write_toml(tmp_path, toml + "\n")
    with pytest.raises(SettingsError, match=rf"^{setting} \(in "):
        load_settings(["--config", path], {})


def test_file_native_types(tmp_path):
    path = write_toml(tmp_path, "\n".join([
        "port = 0",
        "timeout_connect = 1",
        "timeout_tunnel = 0.25",
        'default_ports = ["80 accept-proxy", "443:ssl"]',
        "bind_ports = 8081",
        'dns_nameservers = ["10.0.0.2", "10.0.0.3:5353"]',
        'log_level = "WARNING"',
        "",
    ]))
    s = load_settings(["--config", path], {})
    assert s.port == 0 and s.timeout_connect == 1.0 and s.timeout_tunnel == 0.25
    assert s.default_ports == (ListenSpec(80, options=("accept-proxy",)), ListenSpec(443, ssl=True))
    assert s.bind_ports == (ListenSpec(8081),)
    assert s.dns_nameservers == ("10.0.0.2", "10.0.0.3:5353")
    assert s.log_level == "warning"


def test_unknown_toml_key_is_named_with_a_hint(tmp_path):
    path = write_toml(tmp_path, "port = 1\ntimeout-connect = 3\n")
    hint = r"^timeout-connect \(in .*\): unknown setting, did you mean 'timeout_connect'\?$"
    with pytest.raises(SettingsError, match=hint):
        load_settings(["--config", path], {})


def test_unknown_toml_table_is_an_unknown_key(tmp_path):
    path = write_toml(tmp_path, "[admin]\nport = 1\n")
    with pytest.raises(SettingsError, match=r"^admin \(in .*\): unknown setting"):
        load_settings(["--config", path], {})


def test_unreadable_and_invalid_config_files(tmp_path):
    with pytest.raises(SettingsError, match=r"^--config: cannot read .*absent\.toml"):
        load_settings(["--config", str(tmp_path / "absent.toml")], {})
    with pytest.raises(SettingsError, match=r"^PYROUTE_CONFIG: cannot read"):
        load_settings([], {"PYROUTE_CONFIG": str(tmp_path / "absent.toml")})
    broken = write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(SettingsError, match=r"^--config: .* is not valid TOML"):
        load_settings(["--config", broken], {})


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--bogus", "1"], "--bogus: unknown option"),
        (["serve"], "serve: unknown option"),
        (["--work", "2"], "--work: unknown option"),  # no prefix abbreviations
        (["--port"], "--port: expected one argument"),
    ],
)
def test_bad_flags_raise_settings_error_not_system_exit(argv, problem):
    with pytest.raises(SettingsError) as err:
        load_settings(argv, {})
    assert problem in str(err.value)


# --- DFP port lists -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80,443:ssl", (ListenSpec(80), ListenSpec(443, ssl=True))),
        ("80 accept-proxy", (ListenSpec(80, options=("accept-proxy",)),)),
        (" 80 , 443:ssl accept-proxy  alpn h2 ",
         (ListenSpec(80), ListenSpec(443, ssl=True, options=("accept-proxy", "alpn", "h2")))),
        ("", ()),
        ("   ", ()),
        ("0,0:ssl", (ListenSpec(0), ListenSpec(0, ssl=True))),  # ephemeral ports may repeat
        ("65535", (ListenSpec(65535),)),
    ],
)
def test_parse_listen_specs(text, expected):
    assert parse_listen_specs(text, "DEFAULT_PORTS") == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("http", "'http' is not a port number 0..65535"),
        ("65536", "'65536' is not a port number"),
        ("-80", "'-80' is not a port number"),
        ("+80", "'+80' is not a port number"),
        ("443:tls", "unknown suffix ':tls'"),
        ("443:", "unknown suffix ':'"),
        ("80,,443", "empty entry"),
        ("80,", "empty entry"),
        ("80,443:ssl,80 accept-proxy", "port 80 is listed twice"),
    ],
)
def test_parse_listen_specs_rejects(text, problem):
    with pytest.raises(SettingsError) as err:
        parse_listen_specs(text, "BIND_PORTS")
    assert str(err.value).startswith("BIND_PORTS: ") and problem in str(err.value)


# --- DNS nameservers ----------------------------------------------------------


def test_nameservers_default_from_resolv_conf(monkeypatch, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated by Docker\n"
        "search example.internal\n"
        "nameserver 127.0.0.11\n"
        ";nameserver 9.9.9.9\n"
        "  nameserver   fd00::53  \n"
        "nameserver\n"
        "options ndots:0\n"
    )
    monkeypatch.setattr(config, "RESOLV_CONF", str(resolv))
    s = load_settings([], {})
    assert s.dns_nameservers == ("127.0.0.11", "fd00::53")
    assert s.sources["dns_nameservers"] == "default"


def test_nameservers_fallback_when_resolv_conf_lists_none(monkeypatch, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example.internal\n")
    monkeypatch.setattr(config, "RESOLV_CONF", str(resolv))
    assert load_settings([], {}).dns_nameservers == ("127.0.0.11",)


def test_nameservers_fallback_when_resolv_conf_missing():
    assert load_settings([], {}).dns_nameservers == ("127.0.0.11",)


def test_nameservers_env_beats_resolv_conf(monkeypatch, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.9.9.9\n")
    monkeypatch.setattr(config, "RESOLV_CONF", str(resolv))
    s = load_settings([], {"DNS_NAMESERVERS": " 10.0.0.2 ,dns.local:5353,[fd00::1]:53,::1"})
    assert s.dns_nameservers == ("10.0.0.2", "dns.local:5353", "[fd00::1]:53", "::1")


# --- the example file cannot drift ----------------------------------------------


def test_example_documents_every_setting():
    text = EXAMPLE.read_text()
    for name in SETTING_FIELDS:
        assert re.search(rf"^# {name} = ", text, re.M), f"{name} missing from config.example.toml"
        assert re.search(rf"\benv {name.upper()}\b", text), f"env {name.upper()} missing from config.example.toml"


def test_example_loads_as_is():
    s = load_settings(["--config", str(EXAMPLE)], {})
    assert s.config_file == str(EXAMPLE) and s == Settings(config_file=str(EXAMPLE))


def test_example_defaults_are_the_real_defaults(tmp_path):
    """Uncomment every `# key = value` line: the result must equal the defaults
    (workers aside, whose real default is the CPU count)."""
    uncommented = re.sub(r"^# (\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.M)
    path = write_toml(tmp_path, uncommented)
    s = load_settings(["--config", path], {})
    assert set(name for name, source in s.sources.items() if source == "file") == set(SETTING_FIELDS)
    assert s == dataclasses.replace(Settings(), workers=s.workers, config_file=path)


# --- accepted for DFP, without effect yet -------------------------------------------


def test_timeout_queue_is_read_and_draws_no_warning(tmp_path):
    """TIMEOUT_QUEUE (DFP's name) bounds the wait of a request queued at a service's maxConn /
    maxRequestsInFlight (issue 20): read from the environment or the file, it draws no warning."""
    path = write_toml(tmp_path, "timeout_queue = 12\n")
    for settings in (load_settings([], {"TIMEOUT_QUEUE": "12"}), load_settings(["--config", path], {})):
        assert settings.timeout_queue == 12
        assert config.startup_warnings(settings, {}) == []


def test_startup_warnings_name_each_raw_haproxy_variable_set():
    warnings = config.startup_warnings(Settings(), {"EXTRA_GLOBAL": "x", "RESOLVERS": " ", "CFG_TEMPLATE_PATH": "/t"})
    assert [w.split()[0] for w in warnings] == ["EXTRA_GLOBAL", "CFG_TEMPLATE_PATH"]
