"""All cryptography of mcp-authz: gateway keys (keys.py), credentials at rest (cipher.py), and the
private CA and certificates for the sidecar's TLS listeners (certs.py)."""
