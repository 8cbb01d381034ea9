"""What the controller and the agents share that is not node code (nodes see only
dml_app/): the credentials derived from the admin token."""
