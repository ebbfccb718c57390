"""The Asterisk Manager Interface as data, shared by everything that speaks or stores it.

* :mod:`ami.protocol`: the sans-I/O codec (bytes in, messages out; actions to bytes).
* :mod:`ami.scenario`: the scenario format (raw AMI captures with timing and placeholders) that the
  simulator plays and the gateway's ``filePath`` replays.
* :mod:`ami.permissions`: the write class each AMI action needs in ``manager.conf``.

The gateway (the AMI client) and the simulator (an AMI server) both build on this package and never
on each other; nothing here imports any other package of the project (tests/unit/test_layers.py).
"""
