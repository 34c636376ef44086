"""The fused CPU scan's cache (backbones/mamba_cpu.py) is private and hash-checked: a cache others can write is
not used, a library whose bytes changed after the build is never loaded, and a new cache is owner-only. The
hash and permission functions are tested on dummy files; three tests compile the real library (under a second
each)."""
import ctypes
import hashlib
import os
import stat

import pytest

from backbones import mamba_cpu

needs_compiler = pytest.mark.skipif(mamba_cpu.load() is None, reason="the fused CPU scan did not build (no C++ compiler?)")


@pytest.fixture
def loaded(monkeypatch):
    """Every library load() hands to ctypes, as (path, SHA-256 of the file at that moment)."""
    calls, real = [], ctypes.CDLL

    def spy(path, *args, **kwargs):
        calls.append((str(path), mamba_cpu.sha256_of(path)))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", spy)
    return calls


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_cache_is_created_owner_only(tmp_path):
    cache = mamba_cpu.private_directory(tmp_path / "a" / "cache")
    assert cache.is_dir() and mode(cache) == 0o700


def test_a_cache_others_can_write_or_another_user_owns_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(mamba_cpu.UnsafeCacheError, match="group or others can write it"):
        mamba_cpu.private_directory(shared)
    assert mode(shared) == 0o777  # refused, not silently "fixed": what it holds may already be someone else's
    mine = mamba_cpu.private_directory(tmp_path / "mine")
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as seen by another user
    assert "owned by uid" in mamba_cpu.unsafe_reason(mine)


def test_the_recorded_hash_catches_changed_bytes_a_missing_record_and_a_writable_file(tmp_path):
    lib = tmp_path / "dummy.so"
    lib.write_bytes(b"\x7fELF" + bytes(range(256)))
    mamba_cpu.record_hash(lib)
    assert mamba_cpu.hash_file(lib).read_text() == f"{hashlib.sha256(lib.read_bytes()).hexdigest()}  dummy.so\n"
    assert mamba_cpu.mismatch(lib) == ""
    lib.write_bytes(b"\x7fELF" + bytes(range(255)) + b"!")
    assert mamba_cpu.mismatch(lib).startswith("its SHA-256")
    mamba_cpu.record_hash(lib)
    lib.chmod(0o666)
    assert "group or others can write it" in mamba_cpu.mismatch(lib)
    lib.chmod(0o644)
    mamba_cpu.hash_file(lib).unlink()
    assert mamba_cpu.mismatch(lib) == mamba_cpu.NO_HASH
    assert mamba_cpu.mismatch(tmp_path / "absent.so") == mamba_cpu.NOT_BUILT


@needs_compiler
def test_a_tampered_library_is_rebuilt_and_never_loaded(monkeypatch, tmp_path, loaded):
    build = mamba_cpu.load.__wrapped__  # the uncached loader
    cache = tmp_path / "cache"
    monkeypatch.setenv("TREAD_BENCH_CACHE", str(cache))
    assert build() is not None
    (lib,) = cache.glob("mamba_cpu_scan-*.so")
    assert mode(cache) == 0o700 and loaded == [(str(lib), mamba_cpu.sha256_of(lib))]
    recorded = mamba_cpu.hash_file(lib).read_text().split()[0]
    assert loaded[0][1] == recorded
    tampered = bytearray(lib.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    planted = cache / "planted"
    planted.write_bytes(bytes(tampered))
    os.replace(planted, lib)  # a new file, as an attacker would write it (the loaded one stays mapped intact)
    with pytest.warns(UserWarning, match=r"is not loaded \(its SHA-256 .* is not the recorded .*\); rebuilding it"):
        assert build() is not None
    tampered_hash = hashlib.sha256(bytes(tampered)).hexdigest()
    assert [h for _, h in loaded] == [recorded, recorded] and tampered_hash != recorded  # the rebuilt one
    assert lib.read_bytes() != bytes(tampered) and mamba_cpu.mismatch(lib) == ""


@needs_compiler
def test_a_library_that_still_mismatches_after_the_build_is_refused(monkeypatch, tmp_path, loaded):
    monkeypatch.setenv("TREAD_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mamba_cpu, "record_hash", lambda lib: mamba_cpu.hash_file(lib).write_text("0" * 64 + "\n"))
    with pytest.warns(UserWarning, match="changed right after it was built"):
        assert mamba_cpu.load.__wrapped__() is None  # the pure-PyTorch scan runs instead
    assert loaded == []


@needs_compiler
def test_a_world_writable_cache_is_not_used(monkeypatch, tmp_path, loaded):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TREAD_BENCH_CACHE", str(shared))
    with pytest.warns(UserWarning, match=r"cache is not used \(.*shared: group or others can write it \(mode 0o777\)\)"):
        assert mamba_cpu.load.__wrapped__() is not None  # built in a private temporary directory instead
    assert list(shared.iterdir()) == []  # nothing read from or written into it
    ((path, _),) = loaded
    assert not path.startswith(str(shared))
