"""``rollstream demo``: the closed loop on a calculator task, from agents to a better served policy."""
