"""pgjournal's benchmark harness: pgjournal and its peers, same run, same server.

Run with ``python -m bench`` (``--quick`` for the CI smoke run, ``--help`` for
the options). See ``bench/README.md`` for what each scenario measures.
"""
