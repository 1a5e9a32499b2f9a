"""mcp-authz: an Envoy ext_authz sidecar for MCP traffic."""

__version__ = "0.1.0"
