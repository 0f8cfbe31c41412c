"""What the drill report becomes: terminal summary, JSON, timeline PNG; and the records' dict round trip."""

from __future__ import annotations

import dataclasses
import json

from cluster.ops.drill.records import SLO, Failover, FaultRecord, RequestRecord
from cluster.ops.drill.report import format_summary, write_json, write_png

from .synthetic import KILL, STRICT, healthy_drill, report, req


def test_summary_has_every_slo_line_and_the_verdict_last():
    requests, health = healthy_drill()
    requests.append(req("x", 5.0, "", code="UNAVAILABLE"))
    rep = report(requests, health=health, slo=STRICT)
    text = format_summary(rep)
    lines = text.splitlines()
    for check in rep["slo"]:
        (line,) = [ln for ln in lines if ln.strip().startswith(check["name"] + " ")]
        assert line.rstrip().endswith("PASS" if check["ok"] else "FAIL")
    (failed_line,) = [ln for ln in lines if ln.strip().startswith("max_failed ")]
    assert "FAIL" in failed_line
    assert lines[-1] == "overall  FAIL"
    assert "by client (ejected: connection refused)" in text
    assert "UNAVAILABLE 1" in text
    requests, health = healthy_drill()
    assert format_summary(report(requests, health=health, slo=STRICT)).splitlines()[-1] == "overall  PASS"


def test_summary_of_an_undetected_unrestored_fault():
    never = dataclasses.replace(KILL, restored_at=None)
    text = format_summary(report([], faults=[never], slo=SLO(max_detect_s=1.0)))
    assert "never restored" in text
    assert "detect    never" in text
    assert "never detected: kill eu-west" in text


def test_write_json_round_trips(tmp_path):
    requests, health = healthy_drill()
    rep = report(requests, health=health, slo=STRICT)
    path = write_json(rep, tmp_path / "out" / "report.json")
    assert json.loads(path.read_text()) == rep


def test_records_round_trip_through_dicts():
    requests, health = healthy_drill()
    for record in [requests[10], health[0], KILL, STRICT]:
        again = type(record).from_dict(json.loads(json.dumps(record.to_dict())))
        assert again == record
    assert isinstance(RequestRecord.from_dict(requests[10].to_dict()).failovers[0], Failover)


def test_png_is_written(tmp_path):
    requests, _ = healthy_drill()
    requests.append(req("x", 12.0, "", latency=0.3, code="UNAVAILABLE"))
    faults = [KILL, FaultRecord("freeze us-east", "freeze_region", "us-east", at=25.0, restored_at=None)]
    path = write_png("region-outage", requests, faults, tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
