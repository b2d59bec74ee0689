"""The ``bangui-geo`` command line: run a service, publish IPs, look rows up, show the
by-country view, and inspect or replay dead letters."""
