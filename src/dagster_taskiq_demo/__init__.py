"""The demo application: example jobs, the local stack, the load simulator and `verify`."""
