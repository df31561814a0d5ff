"""The load simulator (scenarios with real faults against the local stack) and `verify`."""
