"""Canonical-msgpack vectors (conformance/vectors/wire) and the hex examples of PROTOCOL.md.

Both directions: every valid case decodes to its value and its value encodes to
exactly its bytes; every invalid case raises the named error with the named code.
"""

import json
import re
from pathlib import Path

import pytest

import federation.errors as federation_errors
from conformance.generators import wire as wire_generator
from conformance.vectorfiles import load_vectors
from federation import codec

FILES = ("canonical", "limits")
PROTOCOL = Path(__file__).resolve().parents[2] / "conformance" / "PROTOCOL.md"


def from_json(value):
    """Inverse of the tagged-JSON notation, written independently of the generator."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$int"}:
            return int(value["$int"])
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def cases(result):
    out = []
    for name in FILES:
        for case in load_vectors("wire", name)["cases"]:
            if case["result"] == result:
                out.append(pytest.param(case, id=f"{name}: {case['description']}"[:90]))
    return out


def test_files_are_what_the_generator_writes():
    for name, data in wire_generator.generate().items():
        assert load_vectors("wire", name) == json.loads(json.dumps(data)), name


def test_files_cover_every_rule_of_design_section_2():
    descriptions = " | ".join(c["description"] for name in FILES for c in load_vectors("wire", name)["cases"])
    for needle in ("uint8 (non-shortest)", "uint16 (non-shortest)", "uint32 (non-shortest)", "uint64 (non-shortest)",
                   "int8 (non-shortest)", "int16 (non-shortest)", "int32 (non-shortest)", "int64 (non-shortest)",
                   "str8 header", "str16 header", "str32 header", "bin16 header", "bin32 header",
                   "array16 header", "array32 header", "map16 header", "map32 header",
                   "unsorted keys", "duplicate keys", "trailing", "invalid UTF-8", "float32", "float64",
                   "fixext1", "fixext16", "ext8", "ext16", "ext32", "integer map key", "bin map key",
                   "nesting too deep", "truncated", "largest uint64", "smallest int64"):
        assert needle in descriptions, needle


@pytest.mark.parametrize("case", cases("valid"))
def test_valid_case_round_trips(case):
    value = from_json(case["value"])
    data = bytes.fromhex(case["canonical"])
    assert codec.encode(value) == data
    assert codec.decode(data) == value


@pytest.mark.parametrize("case", cases("invalid"))
def test_invalid_case_is_rejected(case):
    error = getattr(federation_errors, case["error"])
    with pytest.raises(error) as exc:
        codec.decode(bytes.fromhex(case["encoded"]))
    assert exc.value.code == case["code"]


def protocol_examples():
    text = PROTOCOL.read_text(encoding="utf-8")
    found = re.findall(r"^json: (.+)\nhex:  ([0-9a-f]+)$", text, flags=re.MULTILINE)
    return found


def test_protocol_md_has_an_example_per_frame_type():
    examples = [json.loads(j) for j, _ in protocol_examples()]
    assert any("op" in e for e in examples)
    assert any("ok" in e for e in examples)
    assert any("error" in e for e in examples)
    assert any("push" in e for e in examples)


@pytest.mark.parametrize(("value_json", "hex_text"), protocol_examples())
def test_protocol_md_example_hex_decodes_to_its_value(value_json, hex_text):
    value = from_json(json.loads(value_json))
    assert codec.decode(bytes.fromhex(hex_text)) == value
    assert codec.encode(value).hex() == hex_text
