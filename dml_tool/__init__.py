"""EdgeTB's tools for the confs: the dataset splitter and the per-node conf writers, each
run as `python3 dml_tool/<tool>.py`."""
