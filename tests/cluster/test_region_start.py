"""RegionServer's local Ray start: a raylet that registers late (a busy machine) gets one more try."""

from __future__ import annotations

import os

import pytest

from cluster import region
from cluster.config import ClusterConfig


class _FakeRay:
    """ray.init failing ``failures`` times with Ray's own start-up timeout, then succeeding."""

    def __init__(self, failures: int, message: str = f"The current node {region.RAY_START_TIMEOUT}. ..."):
        self.failures, self.message = failures, message
        self.temp_dirs: list[str] = []
        self.shutdowns = 0

    def init(self, **kwargs) -> None:
        self.temp_dirs.append(kwargs["_temp_dir"])
        if len(self.temp_dirs) <= self.failures:
            raise Exception(self.message)  # noqa: TRY002 -- what ray.init raises

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def fake_ray(monkeypatch):
    def install(failures: int, **kwargs) -> _FakeRay:
        fake = _FakeRay(failures, **kwargs)
        monkeypatch.setattr(region.ray, "init", fake.init)
        monkeypatch.setattr(region.ray, "shutdown", fake.shutdown)
        monkeypatch.setattr(region, "_started_ray_processes", dict)
        return fake

    return install


def test_a_late_raylet_gets_a_second_start_in_a_fresh_temp_dir(fake_ray):
    fake = fake_ray(failures=1)
    server = region.RegionServer(ClusterConfig(), progress=lambda msg: None)
    server._start_ray()
    first, second = fake.temp_dirs
    assert first != second and not os.path.exists(first), "the failed attempt's temp dir is left behind"
    assert fake.shutdowns == 1 and server._owns_ray
    server._remove_temp_dir()


def test_a_second_late_start_or_any_other_error_is_raised(fake_ray):
    fake = fake_ray(failures=2)
    with pytest.raises(Exception, match=region.RAY_START_TIMEOUT):
        region.RegionServer(ClusterConfig(), progress=lambda msg: None)._start_ray()
    assert len(fake.temp_dirs) == 2 and not any(os.path.exists(d) for d in fake.temp_dirs)

    other = fake_ray(failures=1, message="some other failure")
    with pytest.raises(Exception, match="some other failure"):
        region.RegionServer(ClusterConfig(), progress=lambda msg: None)._start_ray()
    assert len(other.temp_dirs) == 1 and not os.path.exists(other.temp_dirs[0])
