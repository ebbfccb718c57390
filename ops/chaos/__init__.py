"""`make chaos` (``python -m ops.chaos``): every fault in turn under call traffic, judged from the
simulator's ground truth. Modules: ``fault_proxy`` (TCP links that cut, stall, slow down),
``servers`` (private RabbitMQ/Redis to restart), ``agents`` (Creatio panels on both transports),
``harness`` (the run and its faults), ``verdict`` (pure: what each fault did to the agents)."""
