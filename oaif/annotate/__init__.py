"""Annotators: backends that judge one ordered pair at a time, and the both-orders judge above them."""
