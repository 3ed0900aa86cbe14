"""Broker conformance suite: every backend must pass these through the `Broker` interface alone."""
