"""The node app: the roles (fl_aggregator.py, fl_trainer.py, gl_peer.py, ...), each started
as `python3 <role>.py` in this folder, and what they share (runtime, HTTP core, formats,
the maths of each algorithm). Its modules import one another as `dml_app.<module>`."""
