"""Policy validation, byte sizes, the env layer and the one-line error messages of settings.py."""

from __future__ import annotations

import pytest

from inferos_cli.errors import ConfigError
from inferos_cli.settings import Policy, env_layer, parse_bytes, resolve, validate_policy
from inferos_cli.units import format_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2048MiB", 2048 * 1024**2), ("4GiB", 4 * 1024**3), (1234, 1234), ("1.5GB", 1_500_000_000),
     ("512k", 512 * 1024), (" 64 mib ", 64 * 1024**2), ("100", 100)],
)
def test_parse_bytes_accepts_units_and_ints(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12XB", "-5", True, -1])
def test_parse_bytes_rejects_garbage(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes_says_its_unit() -> None:
    assert format_bytes(2048 * 1024**2) == "2.0 GiB"
    assert format_bytes(10) == "10 B"
    assert format_bytes(None) == "n/a"


def test_defaults_are_the_guide_values() -> None:
    pol = Policy()
    assert pol.io.dml_pool_bytes == 2048 * 1024**2
    assert pol.io.host_pool_bytes == 4096 * 1024**2
    assert pol.quality.min_accept_rate == 0.5
    assert (pol.loops.fast_ms, pol.loops.mid_ms, pol.loops.slow_ms) == (1, 10, 100)


def test_io_pools_accept_strings_and_ints() -> None:
    pol = validate_policy({"io": {"dml_pool_bytes": "4GiB", "host_pool_bytes": 1024}})
    assert pol.io.dml_pool_bytes == 4 * 1024**3
    assert pol.io.host_pool_bytes == 1024


@pytest.mark.parametrize(
    "thresholds",
    [{"L1_int8": 0.5, "L2_int4": 0.6, "L3_evict": 0.4},  # L1 < L2
     {"L1_int8": 0.7, "L2_int4": 0.7, "L3_evict": 0.3},  # L1 == L2
     {"L1_int8": 0.7, "L2_int4": 0.5, "L3_evict": 0.5},  # L2 == L3
     {"L1_int8": 0.7, "L2_int4": 0.5, "L3_evict": -0.1},  # below 0
     {"L1_int8": 1.2, "L2_int4": 0.5, "L3_evict": 0.3}],  # above 1
)
def test_thresholds_must_be_strictly_ordered_in_unit_interval(thresholds: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        validate_policy({"kv": {"level_thresholds": thresholds}})
    line = info.value.one_line()
    assert "kv.level_thresholds" in line
    assert "L1_int8" in line and "\n" not in line


def test_valid_thresholds_pass() -> None:
    pol = validate_policy({"kv": {"level_thresholds": {"L1_int8": 1.0, "L2_int4": 0.5, "L3_evict": 0.0}}})
    assert pol.kv.level_thresholds.L1_int8 == 1.0


def test_out_of_range_value_names_key_value_and_range() -> None:
    with pytest.raises(ConfigError) as info:
        validate_policy({"kv": {"recent_window": 8}})
    line = info.value.one_line()
    assert "kv.recent_window" in line and "= 8" in line and "16..512" in line


def test_bad_choice_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        validate_policy({"scheduler": {"decode_device": "gpu"}})
    line = info.value.one_line()
    assert "scheduler.decode_device" in line and "'gpu'" in line
    for device in ("dml", "npu", "cuda", "cpu"):
        assert device in line


def test_kv_mode_choices() -> None:
    for mode in ("dynamic", "latency_optimized", "throughput_optimized", "quality_optimized", "disabled"):
        assert validate_policy({"kv": {"mode": mode}}).kv.mode == mode
    with pytest.raises(ConfigError) as info:
        validate_policy({"kv": {"mode": "fast"}})
    assert "throughput_optimized" in info.value.one_line()


def test_unknown_key_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        validate_policy({"kv": {"recent_windw": 64}})
    line = info.value.one_line()
    assert "unknown setting kv.recent_windw" in line and "recent_window" in line


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown setting section 'kvv'"):
        resolve([("config:x.toml", {"kvv": {"recent_window": 64}})])


def test_env_layer_nested_and_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_KV__RECENT_WINDOW", "32")
    monkeypatch.setenv("INFEROS_KV__LEVEL_THRESHOLDS__L1_INT8", "0.9")
    monkeypatch.setenv("INFEROS_IO__DML_POOL_BYTES", "1GiB")
    monkeypatch.setenv("INFEROS_KV__GROUP_SIZE", "64")
    layer = env_layer()
    assert layer == {"kv": {"recent_window": "32", "group_size": "64", "level_thresholds": {"L1_int8": "0.9"}},
                     "io": {"dml_pool_bytes": "1GiB"}}
    resolved = resolve([("env", layer)])
    assert resolved.policy.kv.recent_window == 32
    assert resolved.policy.kv.group_size == 64
    assert resolved.policy.kv.level_thresholds.L1_int8 == 0.9
    assert resolved.policy.io.dml_pool_bytes == 1024**3
    assert resolved.sources["kv.level_thresholds.L1_int8"] == "env"
    assert resolved.sources["kv.sink_tokens"] == "default"


def test_group_size_is_32_or_64() -> None:
    with pytest.raises(ConfigError, match=r"kv.group_size = '48' \(from env\): kv.group_size must be 32 or 64"):
        resolve([("env", {"kv": {"group_size": "48"}})])


def test_error_says_which_layer_set_the_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"kv.recent_window = 9 \(from config:my.toml\)"):
        resolve([("profile:7b", {"kv": {"recent_window": 64}}), ("config:my.toml", {"kv": {"recent_window": 9}})])


def test_ignores_non_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_DEBUG", "1")
    monkeypatch.setenv("INFEROS_CONFIG", "/nowhere.toml")
    assert env_layer() == {}


def test_group_error_names_the_layer_that_broke_it() -> None:
    """Issue 17 item 10a: the thresholds are checked as a group; a profile sets all three, the environment
    one; the error names the environment (the layer whose value broke the order), not the profile."""
    profile = ("profile:3b (size class)", {"kv": {"level_thresholds": {"L1_int8": 0.8, "L2_int4": 0.6,
                                                                        "L3_evict": 0.4}}})
    env = ("env", {"kv": {"level_thresholds": {"L1_int8": "0.1"}}})
    with pytest.raises(ConfigError, match=r"kv.level_thresholds \(from env\)"):
        resolve([profile, env])
    config = ("config:my.toml", {"kv": {"level_thresholds": {"L2_int4": 0.9}}})
    with pytest.raises(ConfigError, match=r"kv.level_thresholds \(from config:my.toml\)"):
        resolve([profile, config])
