"""Imported by Python at start-up when this folder is on PYTHONPATH (the bench puts it there for the
processes it measures): records GC pauses and event-loop lag when CMS_BENCH_PAUSES_DIR is set."""

import os

if os.environ.get("CMS_BENCH_PAUSES_DIR"):
    try:
        from bench.pauses import install
    except ImportError:  # the project is not importable in this process: record nothing rather than fail
        pass
    else:
        install()
