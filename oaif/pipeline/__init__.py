"""The pipeline around the loop: commands that prepare a policy for it (sft, critique,
convert-gguf, init-tiny), stand in for it (offline, best-of-n), train its reward-model judge
(train-rm) or show a run (report). Each builds on the core; nothing in the core imports them.
"""
