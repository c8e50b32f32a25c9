"""Throughput, memory, FLOP and MFU measurements of vlalign's pretraining step, data pipeline and retrieval evaluation.

Run with ``python -m benchmarks.run`` (``make bench`` on the CPU); never collected by the test suite. The model
benchmark imports only models, objectives and tasks, so it runs where the data stack (webdataset) is missing.
"""
