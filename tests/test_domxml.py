"""libvirt domain XML (``core.domxml``), pure: facts of an incoming domain, our report in its metadata, and
``<qemu:override>`` properties merged per NIC alias."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from qemu_offload_handshake.core.domxml import QEMU_NS, domain_facts, with_overrides, with_report
from qemu_offload_handshake.core.errors import UsageError

DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>6f1f2c1e-1111-4a4a-9b9b-000000000001</uuid>
  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>
  <devices>
    <interface type='ethernet'>
      <mac address='52:54:00:12:34:10'/><target dev='qohtap0' managed='no'/>
      <model type='virtio'/><driver name='qemu'/><alias name='net0'/>
    </interface>
    <interface type='user'><mac address='52:54:00:12:34:11'/><model type='virtio'/><alias name='net1'/></interface>
    <interface type='network'><model type='e1000e'/><alias name='net2'/></interface>
    <interface type='bridge'><model type='virtio'/><alias name='net3'/></interface>
  </devices>
  <qemu:override>
    <qemu:device alias='net1'><qemu:frontend>
      <qemu:property name='csum' type='bool' value='false'/>
    </qemu:frontend></qemu:device>
  </qemu:override>
</domain>"""


def test_the_facts_of_an_incoming_domain() -> None:
    facts = domain_facts(DOMAIN)
    assert (facts.name, facts.uuid, facts.machine, facts.report) == (
        "vm1", "6f1f2c1e-1111-4a4a-9b9b-000000000001", "pc-q35-10.0", None)
    assert [(n.alias, n.type, n.kind, n.vhost) for n in facts.nics] == [
        ("net0", "ethernet", "tap", False), ("net1", "user", "user", None), ("net3", "bridge", "tap", None)]
    bare = domain_facts(DOMAIN.replace("<alias name='net0'/>", "").replace("<alias name='net3'/>", ""))
    assert [n.alias for n in bare.nics] == ["net0", "net1", "net3"]  # libvirt's names by position
    assert facts.overrides == {"net1": {"csum": "false"}}


def test_the_report_travels_in_our_metadata_and_replaces_an_older_one() -> None:
    once = with_report(DOMAIN, b"first")
    twice = with_report(once, b"\x00second\xff")
    assert domain_facts(twice).report == b"\x00second\xff"
    assert ET.fromstring(twice).find("metadata") is not None
    assert twice.count("<qoh:report>") == 1


def test_overrides_are_merged_per_alias() -> None:
    xml = with_overrides(DOMAIN, {"net0": {"host_uso": "off", "guest_uso4": "off"}, "net1": {"csum": "on"}})
    facts = domain_facts(xml)
    assert facts.overrides == {"net1": {"csum": "true"}, "net0": {"guest_uso4": "false", "host_uso": "false"}}
    root = ET.fromstring(xml)
    assert len(root.findall(f"{{{QEMU_NS}}}override")) == 1
    again = with_overrides(xml, {"net0": {"host_uso": "on"}}, {"host_uso": "OnOffAuto"})
    assert domain_facts(again).overrides["net0"] == {"guest_uso4": "false", "host_uso": "on"}
    assert domain_facts(with_overrides(DOMAIN.replace("<qemu:override>", "<!--").replace("</qemu:override>", "-->"),
                                       {"net0": {"host_uso": "off"}})).overrides == {"net0": {"host_uso": "false"}}


@pytest.mark.parametrize(("text", "named"), [
    ("<not xml", "not a domain XML"),
    ("<network><name>x</name></network>", "root element is <network>"),
    ("<domain><uuid>x</uuid></domain>", "no <name>"),
    (DOMAIN.replace("<devices>", "<metadata><qoh:report xmlns:qoh='https://github.com/qemu-offload-handshake/"
                                 "qemu-offload-handshake/report/1'>!!!</qoh:report></metadata><devices>"),
     "not base64"),
])
def test_what_is_not_a_usable_domain_is_named(text: str, named: str) -> None:
    with pytest.raises(UsageError, match=named):
        domain_facts(text)


def test_an_override_value_must_be_on_or_off() -> None:
    with pytest.raises(UsageError, match="on or off"):
        with_overrides(DOMAIN, {"net0": {"host_uso": "auto"}})
