"""The web console (README, "Console")."""
