"""Rewriting a destination command line: exact results, QEMU's option syntax, and what is refused."""

from __future__ import annotations

import random
from typing import Any

import pytest

from qemu_offload_handshake.core.argv import apply_adjustments, check_adjustments, split_options
from qemu_offload_handshake.core.errors import UsageError

USO_OFF = {"net0": {"host_uso": "off"}}


def options(value: str) -> list[tuple[str, str]]:
    """(name, value) pairs as QEMU's option parser reads a -device argument."""
    return [(name, val) for name, val, _ in split_options(value)]


# --- what QEMU's option parser does (util/qemu-option.c), on which every rewrite rests ---

@pytest.mark.parametrize(("text", "expected"), [
    ("virtio-net-pci,id=net0,", [("driver", "virtio-net-pci"), ("id", "net0")]),  # a trailing comma: nothing
    ("virtio-net-pci,id=net0,,", [("driver", "virtio-net-pci"), ("id", "net0,")]),  # ",," a literal comma
    ("virtio-net-pci,romfile=a,,,host_uso=on", [("driver", "virtio-net-pci"), ("romfile", "a,"), ("host_uso", "on")]),
    ("virtio-net-pci,,id=net0", [("driver", "virtio-net-pci,id=net0")]),
    ("id=net0,driver=virtio-net-pci", [("id", "net0"), ("driver", "virtio-net-pci")]),
    ("virtio-net-pci,host_uso,nocsum", [("driver", "virtio-net-pci"), ("host_uso", "on"), ("csum", "off")]),
    ("", []),
])
def test_split_options_reads_like_qemu(text: str, expected: list[tuple[str, str]]) -> None:
    assert options(text) == expected


# --- -device driver,k=v ---

def test_trailing_comma_does_not_swallow_the_override() -> None:
    argv = ["qemu", "-device", "virtio-net-pci,id=net0,"]
    result = apply_adjustments(argv, USO_OFF)
    assert result == ["qemu", "-device", "virtio-net-pci,id=net0,host_uso=off"]
    assert options(result[2]) == [("driver", "virtio-net-pci"), ("id", "net0"), ("host_uso", "off")]


def test_escaped_comma_at_the_end_of_a_value_stays_in_that_value() -> None:
    result = apply_adjustments(["qemu", "-device", "virtio-net-pci,id=net0,romfile=a,,"], USO_OFF)
    assert result == ["qemu", "-device", "virtio-net-pci,id=net0,romfile=a,,,host_uso=off"]
    assert options(result[2]) == [("driver", "virtio-net-pci"), ("id", "net0"), ("romfile", "a,"),
                                  ("host_uso", "off")]


def test_every_spelling_of_the_adjusted_property_is_replaced() -> None:
    argv = ["qemu", "-device", "virtio-net-pci,host_uso,id=net0,nohost_uso,host_uso=on,csum=on,guest_uso4"]
    adjustments = {"net0": {"host_uso": "off", "guest_uso4": "off"}}
    assert apply_adjustments(argv, adjustments) == [
        "qemu", "-device", "virtio-net-pci,id=net0,csum=on,host_uso=off,guest_uso4=off"]


def test_the_first_id_is_the_device_id_as_in_qemu() -> None:
    argv = ["qemu", "-device", "id=net0,driver=virtio-net-pci,id=net1", "-device", "virtio-net-pci,id=net1"]
    assert apply_adjustments(argv, USO_OFF) == [
        "qemu", "-device", "id=net0,driver=virtio-net-pci,id=net1,host_uso=off", "-device", "virtio-net-pci,id=net1"]


def test_an_escaped_comma_in_the_driver_is_refused() -> None:
    # QEMU finds the id net0 here (opts_parse_id reads the first option as a flag) but the driver
    # "virtio-net-pci,id=net0", which does not exist.
    with pytest.raises(UsageError, match="device net0 has driver 'virtio-net-pci,id=net0', not a virtio-net one"):
        apply_adjustments(["qemu", "-device", "virtio-net-pci,,id=net0"], USO_OFF)


def test_json_device_gets_booleans_and_a_leading_space_is_not_json() -> None:
    argv = ["qemu", "-device", '{"driver": "virtio-net-pci", "id": "net0", "host_uso": true}']
    assert apply_adjustments(argv, USO_OFF) == [
        "qemu", "-device", '{"driver":"virtio-net-pci","id":"net0","host_uso":false}']
    # QEMU takes JSON only when the argument starts with "{": this one is an option string without an id.
    with pytest.raises(UsageError, match="no -device with id net0"):
        apply_adjustments(["qemu", "-device", ' {"driver": "virtio-net-pci", "id": "net0"}'], USO_OFF)


def test_random_option_strings_keep_every_other_option_and_end_with_the_override() -> None:
    rng = random.Random(7)
    pieces = ["romfile=a,,b", "romfile=,,", "mac=52:54:00:12:34:56", "host_uso=on", "host_uso", "nohost_uso",
              "csum=off", "netdev=n0", "x=", "bus=pcie.0"]
    for _ in range(500):
        parts = ["virtio-net-pci", "id=net0", *rng.sample(pieces, rng.randint(0, len(pieces)))]
        rng.shuffle(parts[1:])
        text = ",".join(parts) + rng.choice(["", ","])
        result = apply_adjustments(["qemu", "-device", text], USO_OFF)[2]
        before = [o for o in options(text) if o[0] != "host_uso"]
        assert options(result) == [*before, ("host_uso", "off")], text


# --- -set and -global ---

def test_set_of_an_adjusted_property_is_rewritten_because_it_would_win() -> None:
    argv = ["qemu", "-device", "virtio-net-pci,id=net0,host_uso=on", "-set", "device.net0.host_uso=on",
            "--set", "device.net0.csum=on", "-set", "device.net1.host_uso=on", "-set", "drive.net0.host_uso=on"]
    assert apply_adjustments(argv, USO_OFF) == [
        "qemu", "-device", "virtio-net-pci,id=net0,host_uso=off", "-set", "device.net0.host_uso=off",
        "--set", "device.net0.csum=on", "-set", "device.net1.host_uso=on", "-set", "drive.net0.host_uso=on"]


def test_set_that_renames_an_adjusted_device_is_refused() -> None:
    argv = ["qemu", "-device", "virtio-net-pci,id=net0", "-set", "device.net0.id=net9"]
    with pytest.raises(UsageError, match=r"-set device\.net0\.id=net9 renames device net0"):
        apply_adjustments(argv, USO_OFF)


def test_global_is_left_alone_because_the_device_property_wins() -> None:
    argv = ["qemu", "-global", "virtio-net-pci.host_uso=on", "-global", "virtio-net-device.host_uso=on",
            "-global", "driver=virtio-net-pci,property=host_uso,value=on", "-device", "virtio-net-pci,id=net0"]
    assert apply_adjustments(argv, USO_OFF) == [*argv[:-1], "virtio-net-pci,id=net0,host_uso=off"]


# --- refused ---

@pytest.mark.parametrize(("adjustments", "message"), [
    ({"net0": {"id": "off"}}, "'id' is not a virtio-net feature property"),
    ({"net0": {"netdev=x,romfile=/y,host_uso": "off"}}, "'netdev=x,romfile=/y,host_uso' is not a virtio-net"),
    ({"net0": {"host_usoo": "off"}}, "did you mean host_uso"),
    ({"net0": {"host_uso": "yes"}}, "host_uso = 'yes': use \"on\" or \"off\""),
    ({"net0": {"host_uso": False}}, "host_uso = False"),
    ({"net0": {"host_uso": "off,romfile=/y"}}, "host_uso = 'off,romfile=/y'"),
    ({"net0,romfile=/y": {"host_uso": "off"}}, "'net0,romfile=/y' is not a plain device id"),
    ({"0net": {"host_uso": "off"}}, "'0net' is not a plain device id"),
    ({"": {"host_uso": "off"}}, "'' is not a device id"),
    ({"/machine/peripheral-anon/device[0]": {"host_uso": "off"}},
     r"device /machine/peripheral-anon/device\[0\] has no id.*add id=NAME to its -device"),
    ({"net0": ["host_uso"]}, "is not a map of properties"),
    (["net0"], "adjustments must map device ids"),
])
def test_bad_adjustments_are_refused_naming_the_bad_part(adjustments: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        apply_adjustments(["qemu", "-device", "virtio-net-pci,id=net0"], adjustments)


def test_check_adjustments_returns_plain_dicts() -> None:
    assert check_adjustments({"net0": {"host_uso": "off"}, "net.1_a-b": {}}) == {"net0": {"host_uso": "off"},
                                                                                "net.1_a-b": {}}


@pytest.mark.parametrize(("argv", "message"), [
    (["qemu", "-device", "e1000,id=net0"], "device net0 has driver 'e1000', not a virtio-net one"),
    (["qemu", "-device", "id=net0"], "device net0 has no driver"),
    (["qemu", "-device", '{"driver": "e1000", "id": "net0"}'], "driver 'e1000'"),
    (["qemu", "-device", "virtio-net-pci,id=net0", "-device", "virtio-net-device,id=net0"],
     "more than one -device with id net0"),
    (["qemu", "-device", "virtio-net-pci,id=net1"], "no -device with id net0"),
    (["qemu", "-device", "{not json"], "not valid JSON"),
])
def test_command_lines_that_cannot_be_adjusted_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        apply_adjustments(argv, USO_OFF)


def test_every_virtio_net_driver_and_alias_is_adjusted() -> None:
    for driver in ("virtio-net-pci", "virtio-net-pci-non-transitional", "virtio-net-device", "virtio-net-ccw",
                   "virtio-net"):
        assert apply_adjustments(["qemu", "-device", f"{driver},id=net0"], USO_OFF)[2] == \
            f"{driver},id=net0,host_uso=off"
