"""Files on disk: atomic writes, the one-writer lock of a run folder, YAML read
safely, and SAEs saved and loaded in dictbench's own layout, SAELens's and other
libraries' (``formats``). Why a stage of its own: every other stage reads or
writes through these modules, and they import no stage, so they sit at the
bottom of the import graph.
"""
