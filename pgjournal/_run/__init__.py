"""The inside of ``pgjournal.run.Run``: the replay engine (``engine``) and the
features built on its interface (``steps``, ``streams``, ``waits``, ``flow``,
``family``, ``patches``). Nothing here is public; ``Run`` is."""
