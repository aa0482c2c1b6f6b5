"""Measuring: decode-step benchmarks, the raw transport hop, the HTTP load generator, their reports."""
