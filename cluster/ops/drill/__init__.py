"""Failover drills (``levante drill``): inject faults into running regions under load and report what clients saw."""
