"""The web console: people manage their own keys and credentials in a browser (README, "Console")."""
