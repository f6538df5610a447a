"""The one lease primitive (`capray.io.lease`) on a local disk and on S3 (a moto server): exclusive
create, conditional renewals and take-overs, age by the store's clock, fencing, giving up in time."""

from __future__ import annotations

import threading
import time
import types

import pytest

from capray.io import lease


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    """(lease URI, storage options) on a local disk or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "leases" / "a.json"), {}
    s3 = request.getfixturevalue("moto_s3")
    options = s3.bucket("leases")
    return f"s3://leases/{tmp_path.name}/a.json", options


def stopped(held: lease.Lease) -> lease.Lease:
    """The holder dies: no release, no more renewals."""
    held._stop.set()
    held._thread.join()
    return held


def race(uri: str, options: dict, contenders: int = 6) -> tuple[list[lease.Lease], int]:
    """`contenders` threads acquire the lease at once: (the leases won, how many were refused)."""
    got, refused, barrier = [], [], threading.Barrier(contenders)

    def contend():
        barrier.wait()
        try:
            got.append(lease.acquire(uri, 1.5, options))
        except lease.LeaseHeld:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, len(refused)


def test_exactly_one_of_many_contenders_gets_a_free_lease_and_then_an_expired_one(where):
    uri, options = where
    for round_ in ("free", "expired"):
        got, refused = race(uri, options)
        assert len(got) == 1 and refused == 5, round_
        winner = stopped(got[0])
        if round_ == "free":
            assert winner.generation == 1
            time.sleep(2.5)  # past the TTL by the store's clock: the next round races for an expired lease
        else:
            assert winner.generation == 2  # a take-over bumps the fence
            winner.release()


def test_a_take_over_fences_the_old_holder_out(where):
    uri, options = where
    old = stopped(lease.acquire(uri, 60, options))
    old.check()
    new = lease.acquire(uri, 60, options, force=True)
    assert new.generation == old.generation + 1
    with pytest.raises(lease.LeaseLost):
        old.check()  # what every commit of the old holder now does: it writes nothing
    with pytest.raises(lease.LeaseLost):
        lease.check_fence(old.fence(), storage_options=options)  # the same check from a Ray task
    new.check()
    assert not old.renew() and "taken over" in old.lost
    old.release()  # the lost holder's release leaves the new lease alone
    new.check()
    new.release()
    assert lease.backend_for(uri, options).read() is None


@pytest.mark.s3
def test_a_clock_90_s_fast_does_not_take_over_a_live_lease(moto_s3, monkeypatch, tmp_path):
    """Age is the store's: the response's Date minus the object's LastModified, not the reader's clock."""
    options = moto_s3.bucket("leases")
    uri = f"s3://leases/{tmp_path.name}/skew.json"
    live = lease.acquire(uri, 60, options)
    fast = types.SimpleNamespace(time=lambda: time.time() + 90, monotonic=time.monotonic)
    monkeypatch.setattr(lease, "time", fast)  # every clock reading of this contender's lease code is 90 s ahead
    with pytest.raises(lease.LeaseHeld, match="last renewed [0-9]s ago"):
        lease.acquire(uri, 60, options)
    monkeypatch.setattr(lease, "time", time)
    live.release()


def test_a_holder_whose_renewals_fail_stops_before_the_lease_can_expire(where, monkeypatch):
    uri, options = where
    told = threading.Event()
    held = lease.acquire(uri, 1.2, options, on_lost=told.set)

    def broken(*_args):
        raise OSError("the store is unreachable")

    monkeypatch.setattr(held.backend, "replace", broken)
    start = time.monotonic()
    assert told.wait(5)
    assert time.monotonic() - start < 1.2, "it gave up after the lease could already have expired"
    assert "could not be renewed" in held.lost
    with pytest.raises(lease.LeaseLost):
        held.check()  # and so nothing more is committed
    held.release()  # gives nothing back: another holder may have it by now
    seen = lease.backend_for(uri, options).read()
    assert seen is not None and seen.body["holder"] == held.holder


def test_a_retried_create_that_sees_its_own_write_wins(where, monkeypatch):
    """botocore retried a create whose first attempt landed (its response lost): the retry gets 412."""
    uri, options = where
    backend_for = lease.backend_for

    def lossy(uri_, options_=None):
        backend = backend_for(uri_, options_)
        create = backend.create

        def create_then_412(data):
            create(data)
            return None

        backend.create = create_then_412
        return backend

    monkeypatch.setattr(lease, "backend_for", lossy)
    held = lease.acquire(uri, 60, options)
    assert held.generation == 1 and held.backend.read().body["holder"] == held.holder
    held.check()
    monkeypatch.setattr(lease, "backend_for", backend_for)
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(uri, 60, options)
    held.release()
