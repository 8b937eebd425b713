"""instance.npz members are untrusted: their array header is checked against the pixel budget, and any
malformed member is one MemberError, before anything is inflated."""

from __future__ import annotations

import io
import resource
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.members import MemberError, decode_instance, encode_instance, instance_from


def npz(payload: bytes, name: str = "instance.npy") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # a fixed date: the bytes, hence the parametrized ids below, are the same in every process
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(info, payload, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<u2", fortran: bool = False) -> bytes:
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def test_an_array_over_the_budget_is_refused_from_its_header() -> None:
    """A 20 kB member whose header claims 100000 x 100000 (20 GB inflated): refused at once, no allocation."""
    huge = (100_000, 100_000)
    member = npz(npy_header(huge) + bytes(1 << 20))  # 1 MiB of zeros deflates to about 1 kB
    assert len(member) < 20_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemberError, match=r"100000x100000, over shards.max_pixels=64000000"):
        decode_instance(member)
    with pytest.raises(MemberError, match="over shards.max_pixels"):
        instance_from({"instance.npz": member})
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: nothing inflated
    small = encode_instance(np.ones((64, 32), np.uint16))
    assert decode_instance(small, max_pixels=64 * 32).shape == (64, 32)
    with pytest.raises(MemberError, match="32x64, over shards.max_pixels=2047"):
        decode_instance(small, max_pixels=2047)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (npz(npy_header((4, 4)) + bytes(16)), "stores 144 bytes for a"),  # data shorter than the header says
        (npz(npy_header((4, 4)) + bytes(64)), "stores 192 bytes for a"),
        (npz(npy_header((4, 4, 3)) + bytes(96)), "not H x W ids"),
        (npz(npy_header((4, 4), "<f4") + bytes(64)), "not H x W ids"),
        (npz(npy_header((4, 4), "|O") + bytes(16)), "not H x W ids|bad .npy header"),
        (npz(npy_header((4, 4), fortran=True) + bytes(32)), "Fortran"),
        (npz(b"not an npy at all", "instance.npy"), "bad .npy header"),
        (npz(npy_header((4, 4)) + bytes(32), "other.npy"), "not 'instance'"),
        (b"PK\x03\x04 truncated", "not a readable .npz"),
        (b"", "not a readable .npz"),
    ],
)
def test_malformed_members_are_one_error(member: bytes, message: str) -> None:
    with pytest.raises(MemberError, match=message):
        decode_instance(member)


def test_a_damaged_member_fails_its_crc() -> None:
    data = bytearray(encode_instance(np.arange(4096, dtype=np.uint16).reshape(64, 64)))
    data[60] ^= 0x55  # inside the deflated data
    with pytest.raises(MemberError):
        decode_instance(bytes(data))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_random_and_truncated_members_never_escape(junk: bytes, cut: int) -> None:
    good = encode_instance(np.arange(600, dtype=np.uint16).reshape(20, 30))
    for member in (junk, good[:cut], good[:cut] + junk):
        try:
            array = decode_instance(member)
        except MemberError:
            continue
        assert array.shape == (20, 30)  # only the intact member decodes
