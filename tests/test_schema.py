"""The event schema at the edge: every bad message is rejected with a reason naming field and value."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laggard.events import (
    MAX_MESSAGE_BYTES,
    EventRejected,
    GpuSample,
    NodeSample,
    decode_node_sample,
    encode,
)


def gpu(**overrides: Any) -> dict[str, Any]:
    fields = {
        "index": 0,
        "uuid": "GPU-0a1b2c3d",
        "model": "H200",
        "util_gpu": 97.5,
        "util_mem": 40.0,
        "power_w": 680.0,
        "power_limit_w": 700.0,
        "sm_clock_mhz": 1467.0,
        "mem_clock_mhz": 3201.0,
        "temp_c": 61.0,
        "mem_used_mib": 20_000.0,
        "mem_total_mib": 143_771.0,
        "clocks_event_reasons": 4,
    }
    return fields | overrides


def node(gpu_overrides: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    sample = {"v": 1, "ts": time.time(), "cluster": "c1", "node": "n1", "gpus": [gpu(**(gpu_overrides or {}))]}
    return sample | overrides


def rejected(raw: dict[str, Any] | str | bytes | None) -> str:
    message = json.dumps(raw) if isinstance(raw, dict) else raw
    with pytest.raises(EventRejected) as caught:
        decode_node_sample(message)
    assert caught.value.reason
    return caught.value.reason


def test_a_tombstone_is_rejected_with_a_reason() -> None:
    assert "no value" in rejected(None)  # a Kafka record without a value: a reject, not a crash


def test_valid_sample_decodes() -> None:
    sample = decode_node_sample(json.dumps(node()))
    assert sample.node == "n1" and sample.gpus[0].power_w == 680.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("util_gpu", 101.0),
        ("util_gpu", -0.5),
        ("power_w", -3.0),
        ("power_limit_w", 0.0),
        ("temp_c", 500.0),
        ("sm_active", 1.5),
        ("index", -1),
        ("uuid", ""),
        ("clocks_event_reasons", 2**64),
    ],
)
def test_out_of_range_gpu_field_names_field_and_value(field: str, value: Any) -> None:
    reason = rejected(node({field: value}))
    assert f"gpus.0.{field}" in reason
    assert repr(value) in reason


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_are_rejected(literal: str) -> None:
    raw = json.dumps(node({"power_w": 123.25})).replace("123.25", literal)
    reason = rejected(raw)
    assert "gpus.0.power_w" in reason
    assert "finite" in reason


def test_nan_from_python_float_is_rejected() -> None:
    with pytest.raises(ValueError, match="power_w"):
        GpuSample.model_validate(gpu(power_w=math.nan))


@pytest.mark.parametrize(
    "ts",
    [
        0.0,
        -1.0,
        1_500_000_000.0,  # 2017: before the accepted range
        time.time() * 1000,  # milliseconds sent as seconds
        time.time() + 7 * 86_400,  # a week ahead
    ],
)
def test_absurd_timestamps_are_rejected(ts: float) -> None:
    reason = rejected(node(ts=ts))
    assert reason.startswith("ts = ")
    assert "outside" in reason


def test_unknown_version_is_rejected() -> None:
    reason = rejected(node(v=2))
    assert reason.startswith("v = 2")


@pytest.mark.parametrize(("where", "expected"), [("top", "colour = 'red'"), ("gpu", "gpus.0.colour = 'red'")])
def test_extra_field_is_rejected(where: str, expected: str) -> None:
    raw = node(colour="red") if where == "top" else node({"colour": "red"})
    reason = rejected(raw)
    assert expected in reason
    assert "Extra inputs" in reason


@pytest.mark.parametrize(("raw", "expected"), [
    (node(v=True), "v = True: Value error, schema version must be the integer 1"),
    (node({"index": True}), "gpus.0.index = True: Input should be a valid integer"),
    (node({"util_gpu": "50"}), "gpus.0.util_gpu = '50': Input should be a valid number"),
    (node(ts="1795688570.1"), "ts = '1795688570.1': Input should be a valid number"),
    (node({"xid": 10**30}), "gpus.0.xid = 1000000000000000000000000000000: Input should be less than or equal to"),
    (node({"xid": 10**400}), "gpus.0.xid = 1000"),
    (node(gpus=[gpu(), gpu()]), "GPU 0 appears twice in one node sample"),
    (node({"util_gpu": True}), "gpus.0.util_gpu = True: Input should be a valid number"),
    (node({"job": "inj\nfleet"}), "gpus.0.job = 'inj\\nfleet': no control characters"),
    (node(node="n\u00001"), "node = 'n\\x001': no control characters"),
], ids=["bool-version", "bool-index", "string-number", "string-ts", "huge-xid", "400-digit-xid", "duplicate-gpu",
        "bool-float", "newline-label", "nul-label"])
def test_loose_types_and_duplicate_gpus_are_rejected(raw: dict[str, Any], expected: str) -> None:
    assert expected in rejected(raw)


def test_one_gpu_per_mig_instance_is_not_a_duplicate() -> None:
    raw = node(gpus=[gpu(mig_instance=1, mig_profile="1g.18gb"), gpu(mig_instance=2, mig_profile="1g.18gb")])
    assert len(decode_node_sample(json.dumps(raw)).gpus) == 2


def test_missing_field_is_named() -> None:
    raw = node()
    del raw["gpus"][0]["power_w"]
    assert "gpus.0.power_w" in rejected(raw)


def test_no_gpus_is_rejected() -> None:
    assert "gpus" in rejected(node(gpus=[]))


def test_not_json_and_oversize_are_rejected() -> None:
    assert "Invalid JSON" in rejected(b"\xff\xfe not json")
    assert str(MAX_MESSAGE_BYTES) in rejected(b" " * (MAX_MESSAGE_BYTES + 1))


# --- fuzzing --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = list(gpu()) + ["sm_active", "energy_j", "xid", "job", "rank"]


def assert_decodes_or_rejects(raw: str | bytes) -> None:
    try:
        sample = decode_node_sample(raw)
    except EventRejected as err:
        assert err.reason.strip(), f"empty reason for {raw!r}"
    else:
        assert isinstance(sample, NodeSample)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_bytes_never_crash(raw: bytes) -> None:
    assert_decodes_or_rejects(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_json_values_never_crash(value: Any) -> None:
    assert_decodes_or_rejects(json.dumps(value))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), json_values, st.sampled_from(["ts", "node", "cluster", "v", "gpus"]), json_values)
def test_fuzz_mutated_samples_never_crash(gpu_field: str, gpu_value: Any, top_field: str, top_value: Any) -> None:
    assert_decodes_or_rejects(json.dumps(node({gpu_field: gpu_value})))
    assert_decodes_or_rejects(json.dumps(node(**{top_field: top_value})))


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_any_label_decodes_to_itself_or_is_refused_for_its_control_characters(label: str) -> None:
    raw = json.dumps(node({"job": label}, node="n-" + label))
    control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in label)
    try:
        sample = decode_node_sample(raw)
    except EventRejected as err:
        assert control and "no control characters" in err.reason, err.reason
    else:
        assert not control and sample.gpus[0].job == label and sample.node == "n-" + label


finite = {"allow_nan": False, "allow_infinity": False}
labels = st.characters(exclude_categories=("Cc", "Cs"))
valid_gpus = st.builds(
    GpuSample,
    index=st.integers(0, 1023),
    uuid=st.text(labels, min_size=1, max_size=40),
    model=st.sampled_from(["H100", "H200", "GB200"]),
    job=st.none() | st.text(labels, max_size=30),
    rank=st.none() | st.integers(0, 100_000),
    util_gpu=st.floats(0, 100, **finite),
    util_mem=st.floats(0, 100, **finite),
    power_w=st.floats(0, 5000, **finite),
    power_limit_w=st.floats(1, 5000, **finite),
    sm_clock_mhz=st.floats(0, 10_000, **finite),
    mem_clock_mhz=st.floats(0, 50_000, **finite),
    temp_c=st.floats(-50, 200, **finite),
    mem_used_mib=st.floats(0, 1e6, **finite),
    mem_total_mib=st.floats(0, 1e6, **finite),
    clocks_event_reasons=st.integers(0, 2**64 - 1),
    energy_j=st.none() | st.floats(0, 1e12, **finite),
    sm_active=st.none() | st.floats(0, 1, **finite),
    xid=st.none() | st.integers(0, 200),
    mig_profile=st.none() | st.sampled_from(["1g.10gb", "3g.40gb"]),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(valid_gpus, min_size=1, max_size=8, unique_by=lambda g: (g.index, g.mig_instance)),
    st.floats(1_600_000_000, time.time(), **finite),
    st.text(labels, min_size=1, max_size=30),
)
def test_valid_samples_round_trip(gpus: list[GpuSample], ts: float, node_name: str) -> None:
    sample = NodeSample(ts=ts, cluster="c1", node=node_name, source="test", gpus=gpus)
    assert decode_node_sample(encode(sample)) == sample
