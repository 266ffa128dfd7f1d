"""Analytic cost model and virtual-clock simulator shared by the mock engine, the simulator and the policy."""
