"""The admin side: every management operation, for the CLI and the admin API alike.

`ops.AdminOps` declares the operations; `service.AdminService` runs them on a
store, `remote.RemoteAdmin` on a sidecar through the admin gRPC API, which
`api.AdminServicer` serves. README's Layout section lists the modules.
"""
