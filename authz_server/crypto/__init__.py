"""All cryptography of mcp-authz: gateway keys (keys.py) and credentials at rest (cipher.py)."""
