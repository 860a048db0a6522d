"""Server side: the ServerApp, user-level DP, held-out evaluation, run records and model release."""
